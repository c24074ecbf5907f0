"""The write canary: commits one row every ~50 ms through a balancer and records every
acknowledged id, so a failover can be checked for lost acknowledged writes (RPO) and timed (RTO).

An id counts as acknowledged only when COMMIT returned. Any error (connection refused, the
primary shutting down, a read-only replica behind a stale route) means: reconnect and retry
with a new id. An id whose commit raised is "in doubt" and may or may not exist afterwards.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import psycopg

TABLE = "haflow_canary_writes"
# libpq options for a client that must notice a server that answers nothing (powered off, cut
# off): without them an open connection waits for TCP's own retransmission timeout (minutes)
# instead of failing within about 3 s and moving on
DEAD_PEER_FAILS_FAST = {"tcp_user_timeout": 3000, "keepalives": 1, "keepalives_idle": 2, "keepalives_interval": 1,
                        "keepalives_count": 2}


@dataclass
class WriteLog:
    acknowledged: list[int] = field(default_factory=list)
    ack_times: list[float] = field(default_factory=list)  # time.time() of each ack
    in_doubt: list[int] = field(default_factory=list)
    errors: list[tuple[float, str]] = field(default_factory=list)  # (time.time(), error class)

    def first_ack_after(self, t: float) -> float | None:
        return next((a for a in self.ack_times if a > t), None)

    def last_ack_before(self, t: float) -> float | None:
        before = [a for a in self.ack_times if a <= t]
        return before[-1] if before else None

    def longest_gap(self) -> float:
        """Longest time between two consecutive acknowledged writes."""
        return max((b - a for a, b in zip(self.ack_times, self.ack_times[1:])), default=0.0)


class Writer(threading.Thread):
    CONNECT_ARGS: dict = {}  # extra psycopg.connect arguments of this kind of client

    def __init__(self, endpoints: list[str], user: str, password: str, dbname: str, run_id: int,
                 interval_s: float = 0.05, connect_timeout_s: int = 2) -> None:
        super().__init__(daemon=True, name="haflow-writer")
        self.endpoints = endpoints
        self.user, self.password, self.dbname = user, password, dbname
        self.run_id = run_id  # ids are run_id * 10^7 + n, unique across runs
        self.interval_s = interval_s
        self.connect_timeout_s = connect_timeout_s
        self.log = WriteLog()
        self._stopping = threading.Event()

    def _connect(self, endpoint: str) -> psycopg.Connection:
        host, port = endpoint.rsplit(":", 1)
        return psycopg.connect(host=host, port=int(port), user=self.user, password=self.password,
                               dbname=self.dbname, connect_timeout=self.connect_timeout_s, autocommit=True,
                               **DEAD_PEER_FAILS_FAST, **self.CONNECT_ARGS)

    def ensure_table(self) -> None:
        with self._connect(self.endpoints[0]) as conn:
            conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id bigint PRIMARY KEY, at timestamptz DEFAULT now())")

    def run(self) -> None:
        n = 0
        conn: psycopg.Connection | None = None
        turn = 0
        while not self._stopping.is_set():
            n += 1
            wid = self.run_id * 10_000_000 + n
            try:
                if conn is None:
                    conn = self._connect(self.endpoints[turn % len(self.endpoints)])
                conn.execute(f"INSERT INTO {TABLE} (id) VALUES (%s)", (wid,))
                self.log.acknowledged.append(wid)
                self.log.ack_times.append(time.time())
            except psycopg.Error as e:
                if conn is not None:
                    self.log.in_doubt.append(wid)  # the statement may have reached the server
                self.log.errors.append((time.time(), type(e).__name__))
                if conn is not None:
                    try:
                        conn.close()
                    except psycopg.Error:
                        pass
                conn = None
                turn += 1  # try the next balancer endpoint, if several were given
                time.sleep(0.05)
                continue
            self._stopping.wait(self.interval_s)
        if conn is not None:
            conn.close()

    def stop(self) -> WriteLog:
        self._stopping.set()
        self.join(timeout=10)
        return self.log


def lost_writes(log: WriteLog, endpoint: str, user: str, password: str, dbname: str, timeout_s: float = 60) -> list[int]:
    """Acknowledged ids that are not in the table (read back through the primary; retried
    while the cluster is still settling after a fault)."""
    host, port = endpoint.rsplit(":", 1)
    lo, hi = min(log.acknowledged), max(log.acknowledged)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with psycopg.connect(host=host, port=int(port), user=user, password=password, dbname=dbname,
                                 connect_timeout=5) as conn:
                present = {r[0] for r in conn.execute(f"SELECT id FROM {TABLE} WHERE id BETWEEN %s AND %s", (lo, hi))}
            return [i for i in log.acknowledged if i not in present]
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class PooledWriter(Writer):
    """The writer through the nodes' poolers (PgBouncer, transaction pooling): no server-side
    prepared statements, which such a pooler cannot route, as any of its clients must."""

    CONNECT_ARGS = {"prepare_threshold": None}


class LongTransactions(threading.Thread):
    """Transactions of 0.3 s each through a pooler, back to back, like a scheduler's loop: one is
    open whenever the primary stops. Keeps the time of each commit and of each error."""

    def __init__(self, endpoint: str, user: str, password: str, dbname: str) -> None:
        super().__init__(daemon=True, name="haflow-long-transactions")
        self.endpoint, self.user, self.password, self.dbname = endpoint, user, password, dbname
        self.halt = threading.Event()
        self.commits: list[float] = []
        self.errors: list[tuple[float, str]] = []

    def run(self) -> None:
        host, port = self.endpoint.rsplit(":", 1)
        conn = None
        while not self.halt.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(host=host, port=int(port), user=self.user, password=self.password,
                                           dbname=self.dbname, connect_timeout=5, **PooledWriter.CONNECT_ARGS)
                with conn.transaction():
                    conn.execute("SELECT pg_sleep(0.3)")
                self.commits.append(time.time())
            except psycopg.Error as e:
                self.errors.append((time.time(), type(e).__name__))
                conn = None
        if conn is not None:
            conn.close()

    def stop(self) -> list[tuple[float, str]]:
        self.halt.set()
        self.join(30)
        return self.errors

    def longest_gap(self) -> float:
        return max((b - a for a, b in zip(self.commits, self.commits[1:])), default=0.0)
