"""haflow's example DAG: a fan-out of tasks that Celery spreads over the workers of every node.

Each task reports the node it ran on (haflow sets HAFLOW_NODE per node), so a run shows that
the work really was distributed. `haflow up` triggers it and waits for it to succeed.
"""

from __future__ import annotations

import os
import socket
import time

import pendulum
from airflow.sdk import dag, task


@dag(
    dag_id="haflow_example",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["haflow"],
    default_args={"retries": 2},
)
def haflow_example():
    @task
    def start() -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    @task
    def work(i: int, started: str) -> dict:
        time.sleep(1)  # long enough for the other workers to pick up their share
        return {"task": i, "node": os.environ.get("HAFLOW_NODE", socket.gethostname()), "started": started}

    @task
    def report(results: list[dict]) -> dict:
        nodes = sorted({r["node"] for r in results})
        print(f"{len(results)} tasks ran on {len(nodes)} node(s): {', '.join(nodes)}")
        return {"tasks": len(results), "nodes": nodes}

    started = start()
    report(work.partial(started=started).expand(i=list(range(9))))


haflow_example()
