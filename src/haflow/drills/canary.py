"""The task canary: the drill triggers haflow_canary (examples/dags/haflow_canary.py) again and
again through the api balancers; every task execution records a row in its own table. Afterwards
the rows are compared with the DAG runs that were triggered.

Run ids carry the drill's id, so runs whose trigger request died half-way (an api-server killed
under it) are found in the database too, not only the acknowledged ones.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import psycopg

from haflow.components import airflow

DAG_ID = "haflow_canary"
TABLE = "haflow_canary_tasks"
TASKS_PER_RUN = 3  # must match TASKS in the DAG file
DDL = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} (execution uuid PRIMARY KEY, run_id text NOT NULL, task_id text NOT NULL,"
    " map_index int NOT NULL, try_number int NOT NULL, node text NOT NULL, started timestamptz NOT NULL,"
    " finished timestamptz NOT NULL)"
)
TERMINAL = ("success", "failed")


@dataclass
class TriggerLog:
    triggered: list[tuple[float, str]] = field(default_factory=list)  # (time.time(), run_id) acknowledged
    errors: list[tuple[float, str]] = field(default_factory=list)


class CanaryLoad(threading.Thread):
    """Triggers one canary run every `interval_s`, rotating over the nodes' api balancers when
    one fails (an api-server or a whole node may be dead)."""

    def __init__(self, api_urls: list[str], connect: Any, prefix: str, interval_s: float = 1.5) -> None:
        super().__init__(daemon=True, name="haflow-canary")
        self.api_urls = api_urls
        self.connect = connect  # url -> airflow.ApiClient (authenticated)
        self.prefix = prefix
        self.interval_s = interval_s
        self.log = TriggerLog()
        self._stopping = threading.Event()

    def run(self) -> None:
        client: airflow.ApiClient | None = None
        turn, n = 0, 0
        while not self._stopping.is_set():
            n += 1
            run_id = f"{self.prefix}-{n:05d}"
            try:
                if client is None:
                    client = self.connect(self.api_urls[turn % len(self.api_urls)])
                r = client.http.post(f"{client.base}/api/v2/dags/{DAG_ID}/dagRuns",
                                     json={"dag_run_id": run_id, "logical_date": None, "conf": {}})
                r.raise_for_status()
                self.log.triggered.append((time.time(), run_id))
            except (httpx.HTTPError, OSError) as e:
                self.log.errors.append((time.time(), type(e).__name__))
                client = None
                turn += 1
                self._stopping.wait(0.2)
                continue
            self._stopping.wait(self.interval_s)

    def stop(self) -> TriggerLog:
        self._stopping.set()
        self.join(timeout=30)
        return self.log


def ensure_table(conn: psycopg.Connection) -> None:
    conn.execute(DDL)


def runs(conn: psycopg.Connection, prefix: str) -> dict[str, str]:
    """Every canary run of this drill (acknowledged or not) with its state."""
    rows = conn.execute("SELECT run_id, state FROM dag_run WHERE dag_id = %s AND run_id LIKE %s",
                        (DAG_ID, prefix + "-%")).fetchall()
    return {r: s for r, s in rows}


def executions(conn: psycopg.Connection, prefix: str) -> list[dict[str, Any]]:
    rows = conn.execute(
        f"SELECT run_id, task_id, map_index, try_number, node, extract(epoch FROM started), extract(epoch FROM finished)"
        f" FROM {TABLE} WHERE run_id LIKE %s ORDER BY started", (prefix + "-%",)).fetchall()
    return [{"run_id": r[0], "task_id": r[1], "map_index": r[2], "try_number": r[3], "node": r[4],
             "started": float(r[5]), "finished": float(r[6])} for r in rows]


def task_instances(conn: psycopg.Connection, prefix: str) -> list[tuple[str, str, int, str | None]]:
    return conn.execute("SELECT run_id, task_id, map_index, state FROM task_instance WHERE dag_id = %s AND run_id LIKE %s",
                        (DAG_ID, prefix + "-%")).fetchall()


def retries(conn: psycopg.Connection, prefix: str) -> dict[str, Any]:
    """Task instances of the drill that needed more than one try, and the time retries added:
    for each, from its first try's start to its last try's start (Airflow keeps earlier tries
    in task_instance_history)."""
    rows = conn.execute(
        "SELECT extract(epoch FROM ti.start_date - (SELECT min(h.start_date) FROM task_instance_history h"
        " WHERE h.dag_id = ti.dag_id AND h.run_id = ti.run_id AND h.task_id = ti.task_id AND h.map_index = ti.map_index))"
        " FROM task_instance ti WHERE ti.dag_id = %s AND ti.run_id LIKE %s AND ti.try_number > 1",
        (DAG_ID, prefix + "-%")).fetchall()
    return {"retried": len(rows), "delay_s": round(sum(float(r[0] or 0) for r in rows), 2)}


def wait_runs_finished(conn_factory: Any, prefix: str, timeout_s: float) -> dict[str, str]:
    """Until every run of the drill is success or failed (or the timeout); the last states seen."""
    deadline = time.monotonic() + timeout_s
    states: dict[str, str] = {}
    while True:
        try:
            with conn_factory() as conn:
                states = runs(conn, prefix)
        except psycopg.OperationalError:
            pass
        if states and all(s in TERMINAL for s in states.values()):
            return states
        if time.monotonic() > deadline:
            return states
        time.sleep(2)


def longest_gap(events: list[float], start: float, end: float) -> tuple[float, float]:
    """Longest stretch in [start, end] with no event; returns (gap seconds, where it began)."""
    points = [start, *sorted(e for e in events if start < e < end), end]
    best, at = 0.0, start
    for a, b in zip(points, points[1:]):
        if b - a > best:
            best, at = b - a, a
    return best, at


def verdict(states: dict[str, str], rows: list[dict[str, Any]], tis: list[tuple[str, str, int, str | None]]) -> dict[str, Any]:
    """The task invariants: runs failed or unfinished, task instances never executed, duplicates."""
    executed: dict[tuple[str, str, int], int] = {}
    for r in rows:
        key = (r["run_id"], r["task_id"], r["map_index"])
        executed[key] = executed.get(key, 0) + 1
    expected = {(run, task, idx) for run, task, idx, _ in tis if idx >= 0} | {
        # a run may not have expanded its tasks yet when it is counted: each run has TASKS_PER_RUN
        (run, "probe", i) for run in states for i in range(TASKS_PER_RUN)}
    return {
        "dag_runs": len(states),
        "dag_runs_failed": sum(1 for s in states.values() if s == "failed"),
        "dag_runs_unfinished": sum(1 for s in states.values() if s not in TERMINAL),
        "task_instances": len(expected),
        "task_executions": len(rows),
        "tasks_never_executed": sum(1 for k in expected if k not in executed),
        "duplicate_executions": sum(n - 1 for n in executed.values() if n > 1),
    }
