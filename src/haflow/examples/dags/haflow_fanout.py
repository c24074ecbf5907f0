"""20 tasks of a few seconds each: long enough to kill things under them (haflow's failover
tests), short enough to finish quickly. Each task records the node it ran on."""

from __future__ import annotations

import os
import time

import pendulum
from airflow.sdk import dag, task


@dag(dag_id="haflow_fanout", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
     catchup=False, tags=["haflow"], default_args={"retries": 2}, max_active_tasks=32)
def haflow_fanout():
    @task
    def sleep(i: int) -> str:
        time.sleep(3)
        return os.environ.get("HAFLOW_NODE", "?")

    @task
    def done(nodes: list[str]) -> int:
        print(f"{len(nodes)} tasks ran on {sorted(set(nodes))}")
        return len(nodes)

    done(sleep.expand(i=list(range(20))))


haflow_fanout()
