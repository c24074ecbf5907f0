"""100 no-op tasks: the end-to-end throughput of the scheduler -> broker -> worker -> Execution
API path (haflow's benchmark compares the HA cluster with a single-node Airflow)."""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, task


@dag(dag_id="haflow_noop100", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
     catchup=False, tags=["haflow"], default_args={"retries": 2}, max_active_tasks=64)
def haflow_noop100():
    @task
    def noop(i: int) -> None:
        return None

    noop.expand(i=list(range(100)))


haflow_noop100()
