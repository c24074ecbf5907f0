"""PgBouncer on every node, in front of the node's balancer: Airflow's database connections go
through it (transaction pooling: a few server connections per node instead of every process's
pool), and a planned switchover pauses it, so its clients wait instead of failing.

The pooler reaches PostgreSQL only through the node's HAProxy read-write port, which follows
the primary; it holds no state of its own. PgBouncer 1.18 (Debian 12) cannot carry server-side
prepared statements in transaction mode: its clients must not use them (psycopg:
``prepare_threshold=None``, see the Airflow component).
"""

from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psycopg

from haflow.components.base import DesiredState, Directory, File, LayerStatus, Needs, Package, Service
from haflow.facts import ClusterFacts, NodeFacts, NodeLayout
from haflow.secrets import Secrets

NAME = "pgbouncer"
BINARY = "pgbouncer"
ADMIN_DB = "pgbouncer"  # the admin console's database name


def runs_on(node: NodeFacts) -> bool:
    return True  # every node's Airflow processes (a worker's Celery results too) use their own


def needs(facts: ClusterFacts, layout: NodeLayout) -> Needs:
    return Needs(packages=(Package("pgbouncer", "PgBouncer", commands=(BINARY,)),),
                 users=tuple(u for u in [layout.user(NAME)] if u))


def folder(layout: NodeLayout) -> Path:
    return layout.services / NAME


def _quoted(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def userlist(secrets: Secrets) -> str:
    """Who may log in, with the password PgBouncer also uses towards PostgreSQL (SCRAM both
    ways needs the plain password here; the file is 0600, its user's only)."""
    accounts = [secrets["postgres_airflow"], secrets["pooler_admin"]]
    return "".join(f"{_quoted(a.username)} {_quoted(a.password)}\n" for a in accounts)


def config_text(facts: ClusterFacts, node: NodeFacts, layout: NodeLayout, secrets: Secrets) -> str:
    p = facts.spec.pooler
    host, port = node.pg_primary.rsplit(":", 1)
    lines = [
        f"; Rendered by haflow for node {node.name} of cluster {facts.name}; edits are overwritten.",
        "[databases]",
        f"{facts.airflow_db} = host={host} port={port} dbname={facts.airflow_db}",
        "",
        "[pgbouncer]",
        f"listen_addr = {node.address}",
        f"listen_port = {facts.spec.ports.pooler}",
        "unix_socket_dir =",
        "auth_type = scram-sha-256",
        f"auth_file = {folder(layout) / 'userlist.txt'}",
        f"admin_users = {secrets['pooler_admin'].username}",
        "pool_mode = transaction",
        f"default_pool_size = {p.pool_size}",
        f"max_client_conn = {p.max_client_conn}",
        # the balancer drops a failed primary's connections; a login that failed meanwhile is
        # retried after 1 s, not PgBouncer's 15 (clients wait for it, up to query_wait_timeout)
        "server_login_retry = 1",
        "server_connect_timeout = 5",
        # psycopg and SQLAlchemy send no such startup parameter, JDBC-like clients do
        "ignore_startup_parameters = extra_float_digits",
        "log_connections = 0",
        "log_disconnections = 0",
        "",
    ]
    return "\n".join(lines)


def render(facts: ClusterFacts, node: NodeFacts, layout: NodeLayout, secrets: Secrets) -> DesiredState:
    user = layout.user(NAME)
    ini = folder(layout) / "pgbouncer.ini"
    return DesiredState(
        dirs=[Directory(folder(layout), 0o700, user)],
        files=[File(ini, config_text(facts, node, layout, secrets), 0o600, user),
               File(folder(layout) / "userlist.txt", userlist(secrets), 0o600, user)],
        services=[Service(
            name=NAME,
            user=user,
            cwd=folder(layout),
            # without -d it stays in the foreground and logs to stderr
            argv=(shutil.which(BINARY) or f"/usr/sbin/{BINARY}", str(ini)),
            stop_signal="INT",  # safe shutdown: waits for the clients' transactions to end
            stop_timeout_s=10,
            reload_signal="HUP",  # a new password list or pool size: no client is dropped
            restart_files=(ini,),  # a new address or port needs a new listener
            after=("haproxy",),
        )],
    )


# --- the admin console ---------------------------------------------------------------------------


def admin(node: NodeFacts, secrets: Secrets, timeout: float = 3) -> psycopg.Connection:
    """A connection to the node's admin console (it speaks the simple query protocol only)."""
    a = secrets["pooler_admin"]
    host, port = node.pooler.rsplit(":", 1)
    return psycopg.connect(host=host, port=int(port), user=a.username, password=a.password, dbname=ADMIN_DB,
                           autocommit=True, connect_timeout=max(1, int(timeout)), cursor_factory=psycopg.ClientCursor)


def command(node: NodeFacts, secrets: Secrets, sql: str) -> bool:
    """One admin command; False when the pooler does not answer or refuses it."""
    try:
        with admin(node, secrets) as conn:
            conn.execute(sql)
        return True
    except psycopg.Error:
        return False


def pause_all(facts: ClusterFacts, secrets: Secrets, timeout_s: float) -> list[str]:
    """PAUSE every pooler at once (each returns when its running transactions have ended and it
    has closed its server connections; new queries wait). Returns the nodes paused; a pooler
    that did not pause within `timeout_s` is resumed and left out. A PAUSE still waiting runs
    on in a daemon thread: neither the switchover nor the command's exit waits for it."""
    answers: dict[str, bool] = {}

    def pause(node: NodeFacts) -> None:
        answers[node.name] = command(node, secrets, "PAUSE")

    threads = [threading.Thread(target=pause, args=(n,), daemon=True) for n in facts.nodes]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    decided = dict(answers)  # a PAUSE answering from now on is too late, and resumed below
    for n in facts.nodes:
        if n.name not in decided:
            command(n, secrets, "RESUME")  # ends its pending PAUSE
    return sorted(n for n, ok in decided.items() if ok)


def resume(facts: ClusterFacts, secrets: Secrets, nodes: list[str]) -> list[str]:
    """RESUME the given poolers; returns those that did not take it."""
    with ThreadPoolExecutor(max_workers=max(1, len(nodes))) as pool:
        ok = list(pool.map(lambda n: command(facts.node(n), secrets, "RESUME"), nodes))
    return [n for n, good in zip(nodes, ok) if not good]


# --- probe -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolerMember:
    node: str
    healthy: bool
    paused: bool
    clients: int  # client connections, active and waiting
    waiting: int  # clients waiting for a server connection
    servers: int  # server connections open (to the balancer)
    reason: str | None


@dataclass(frozen=True)
class PoolerStatus(LayerStatus):
    members: tuple[PoolerMember, ...]

    @classmethod
    def unknown(cls, facts: ClusterFacts, reason: str) -> "PoolerStatus":
        members = tuple(PoolerMember(n, False, False, 0, 0, 0, reason) for n in facts.node_names)
        return cls(healthy=False, problems=(reason,), members=members)


def _member(node: NodeFacts, secrets: Secrets, database: str) -> PoolerMember:
    try:
        with admin(node, secrets, timeout=2) as conn:
            dbs = {r["name"]: r for r in _rows(conn, "SHOW DATABASES")}
            pools = [r for r in _rows(conn, "SHOW POOLS") if r["database"] == database]
    except psycopg.Error as e:
        return PoolerMember(node.name, False, False, 0, 0, 0, f"not answering ({str(e).strip().splitlines()[0]})")
    paused = bool(dbs.get(database, {}).get("paused"))
    clients = sum(r["cl_active"] + r["cl_waiting"] for r in pools)
    waiting = sum(r["cl_waiting"] for r in pools)
    servers = sum(r["sv_active"] + r["sv_idle"] + r["sv_used"] + r["sv_tested"] + r["sv_login"] for r in pools)
    reason = "paused (an interrupted switchover? `haflow up` resumes it)" if paused else None
    return PoolerMember(node.name, not paused, paused, clients, waiting, servers, reason)


def _rows(conn: psycopg.Connection, sql: str) -> list[dict]:
    cur = conn.execute(sql)
    names = [d.name for d in cur.description or ()]
    return [dict(zip(names, row)) for row in cur.fetchall()]


def probe(facts: ClusterFacts, secrets: Secrets) -> PoolerStatus:
    """Layer status: every node's pooler answers its admin console and is not paused."""
    with ThreadPoolExecutor(max_workers=len(facts.nodes)) as pool:
        members = tuple(pool.map(lambda n: _member(n, secrets, facts.airflow_db), facts.nodes))
    problems = tuple(f"pooler on {m.node}: {m.reason}" for m in members if not m.healthy)
    return PoolerStatus(healthy=not problems, problems=problems, members=members)
