"""What lives inside PostgreSQL: the accounts and databases Airflow needs.

Run through a node's balancer primary port after the database layer is healthy; idempotent,
and it keeps each role's password equal to the one in the secrets file.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import socket
import time

import psycopg
from psycopg import sql

from haflow.errors import ClusterUnhealthy
from haflow.facts import ClusterFacts
from haflow.secrets import Secrets


def connect(endpoint: str, secrets: Secrets, dbname: str = "postgres", timeout: int = 3) -> psycopg.Connection:
    host, port = endpoint.rsplit(":", 1)
    su = secrets["postgres_superuser"]
    return psycopg.connect(
        host=host, port=int(port), user=su.username, password=su.password, dbname=dbname,
        connect_timeout=timeout, autocommit=True,
    )


def connect_airflow(facts: ClusterFacts, secrets: Secrets, endpoint: str, timeout: int = 3) -> psycopg.Connection:
    """The Airflow database as the airflow account (what Airflow itself and the drills use)."""
    host, port = endpoint.rsplit(":", 1)
    account = secrets["postgres_airflow"]
    return psycopg.connect(host=host, port=int(port), user=account.username, password=account.password,
                           dbname=facts.airflow_db, connect_timeout=timeout, autocommit=True)


def connect_any(facts: ClusterFacts, secrets: Secrets) -> psycopg.Connection:
    """The Airflow database through the first balancer that answers (ClusterUnhealthy if none)."""
    last: Exception | None = None
    for n in facts.nodes:
        try:
            return connect_airflow(facts, secrets, n.pg_primary)
        except psycopg.OperationalError as e:
            last = e
    raise ClusterUnhealthy(f"no balancer routes to the database ({last}); run `haflow status`")


def airflow_schema_present(facts: ClusterFacts, secrets: Secrets) -> bool:
    """Whether `airflow db migrate` ever completed on this database (Alembic's version row is
    there): a record on the control machine alone can outlive servers that were rebuilt."""
    with connect_any(facts, secrets) as conn:
        row = conn.execute("SELECT to_regclass('public.alembic_version') IS NOT NULL").fetchone()
        if not row or not row[0]:
            return False
        return conn.execute("SELECT count(*) FROM alembic_version").fetchone()[0] > 0


def live_primary_endpoint(facts: ClusterFacts, timeout: float = 0.5) -> str:
    """The primary port of the first balancer that accepts a connection (a dead node's does not)."""
    for n in facts.nodes:
        host, port = n.pg_primary.rsplit(":", 1)
        try:
            with socket.create_connection((host, int(port)), timeout=timeout):
                return n.pg_primary
        except OSError:
            continue
    return facts.nodes[0].pg_primary


SCRAM_ITERATIONS = 4096  # PostgreSQL's own default (scram_iterations)


def scram_verifier(password: str, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for `password` (RFC 5802/7677, the format of
    pg_authid.rolpassword). Sent instead of the password, the server never sees the clear text,
    so it cannot end up in its logs or pg_stat_statements. Generated passwords are ASCII, for
    which SASLprep changes nothing."""
    salt = salt if salt is not None else os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def role_statement(verb: str, username: str, password: str) -> sql.Composed:
    """CREATE/ALTER ROLE ... LOGIN PASSWORD '<verifier>': the password itself is never sent."""
    return sql.SQL("{} ROLE {} LOGIN PASSWORD {}").format(
        sql.SQL(verb), sql.Identifier(username), sql.Literal(scram_verifier(password)))


def _airflow_login_works(facts: ClusterFacts, secrets: Secrets, endpoint: str) -> bool:
    try:
        with connect_airflow(facts, secrets, endpoint):
            return True
    except psycopg.OperationalError:
        return False


def ensure_airflow_database(facts: ClusterFacts, secrets: Secrets, endpoint: str) -> list[str]:
    """Create (or fix) the airflow role and database; returns what was done (nothing on a re-run)."""
    if _airflow_login_works(facts, secrets, endpoint):
        return []
    account = secrets["postgres_airflow"]
    done = []
    with connect(endpoint, secrets) as conn:
        role = sql.Identifier(account.username)
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (account.username,)).fetchone()
        verb = "ALTER" if exists else "CREATE"
        conn.execute(role_statement(verb, account.username, account.password))
        done.append(f"{'updated' if exists else 'created'} role {account.username}")
        db = facts.airflow_db
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,)).fetchone():
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(db), role))
            done.append(f"created database {db}")
    return done


def checkpoint(facts: ClusterFacts, secrets: Secrets) -> bool:
    """CHECKPOINT on the primary through a balancer (before a switchover: the demoting primary's
    own checkpoint, which clients wait out, then has little left to write). False if it failed:
    the switchover goes on, only slower."""
    try:
        with connect(live_primary_endpoint(facts), secrets, timeout=3) as conn:
            conn.execute("CHECKPOINT")
        return True
    except psycopg.Error:
        return False


def await_writable(endpoint: str, secrets: Secrets, timeout: float = 10.0) -> bool:
    """Until the PostgreSQL behind `endpoint` has left recovery (a promotion ends a moment after
    Patroni answers 200 on /primary; a write in between is refused as read-only), polled every
    20 ms on one connection. False if not within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with connect(endpoint, secrets, timeout=2) as conn:
                while time.monotonic() < deadline:
                    if not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                        return True
                    time.sleep(0.02)
        except psycopg.Error:
            time.sleep(0.05)
    return False
