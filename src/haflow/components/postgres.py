"""What lives inside PostgreSQL: the accounts and databases Airflow needs.

Run through a node's balancer primary port after the database layer is healthy; idempotent,
and it keeps each role's password equal to the one in the secrets file.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

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
        # The password is sent as a literal in DDL (parameters are not allowed there); it is
        # hashed with scram-sha-256 by the server before storage.
        conn.execute(sql.SQL("{} ROLE {} LOGIN PASSWORD {}").format(sql.SQL(verb), role, sql.Literal(account.password)))
        done.append(f"{'updated' if exists else 'created'} role {account.username}")
        db = facts.airflow_db
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,)).fetchone():
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(db), role))
            done.append(f"created database {db}")
    return done
