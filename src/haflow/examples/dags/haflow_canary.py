"""haflow's canary DAG: the task load of `haflow drill`.

The drill triggers it continuously. Each task execution (every try, on whichever worker) records
one row in the table `haflow_canary_tasks` of the Airflow database when it finishes: run, task,
map index, try number, node, start and end time. The drill compares those rows with the DAG runs
it triggered: a task instance without a row never executed, two rows for one task instance are a
duplicate execution.

The row is written through the node's balancer (HAFLOW_CANARY_DSN, set by haflow on every
node); a database failover in the middle is waited out, not failed. Triggered by hand, outside
any drill, it creates its table itself and succeeds the same way.
"""

from __future__ import annotations

import os
import time
import uuid

import pendulum
from airflow.sdk import dag, get_current_context, task

TABLE = "haflow_canary_tasks"
TASKS = 3  # task instances per run
WORK_S = 1.0  # how long each task "works": long enough to be running when a worker dies
RECORD_TIMEOUT_S = 120  # longer than any database failover
DDL = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} (execution uuid PRIMARY KEY, run_id text NOT NULL, task_id text NOT NULL,"
    " map_index int NOT NULL, try_number int NOT NULL, node text NOT NULL, started timestamptz NOT NULL,"
    " finished timestamptz NOT NULL)"
)


def _create_table(conn) -> None:
    import psycopg

    try:
        conn.execute(DDL)
    except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable):
        pass  # a task of the same run created it at the same moment


def _record(started: float) -> None:
    import psycopg

    ti = get_current_context()["ti"]
    row = (str(uuid.uuid4()), ti.run_id, ti.task_id, ti.map_index, ti.try_number, os.environ.get("HAFLOW_NODE", os.uname().nodename),
           started, time.time())
    deadline = time.monotonic() + RECORD_TIMEOUT_S  # the retried INSERT is idempotent by its execution id
    while True:
        try:
            with psycopg.connect(os.environ["HAFLOW_CANARY_DSN"], connect_timeout=3, autocommit=True) as conn:
                _create_table(conn)
                conn.execute(
                    f"INSERT INTO {TABLE} (execution, run_id, task_id, map_index, try_number, node, started, finished)"
                    " VALUES (%s, %s, %s, %s, %s, %s, to_timestamp(%s), to_timestamp(%s)) ON CONFLICT DO NOTHING",
                    row,
                )
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@dag(
    dag_id="haflow_canary",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=64,
    tags=["haflow"],
    default_args={"retries": 3, "retry_delay": pendulum.duration(seconds=5)},
)
def haflow_canary():
    @task
    def probe(i: int) -> None:
        started = time.time()
        time.sleep(WORK_S)
        _record(started)

    probe.expand(i=list(range(TASKS)))


haflow_canary()
