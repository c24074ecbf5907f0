"""The pooler (PgBouncer) on every node: what it is told, and what a spec may ask of it."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import yaml

from haflow.cluster import Cluster
from haflow.components import pgbouncer
from haflow.errors import SpecError
from haflow.secrets import Account, Secrets
from haflow.spec import default_spec_text, parse_spec

ADDRESSES = ["127.0.0.91", "127.0.0.92", "127.0.0.93"]


def cluster(tmp_path: Path, **pooler) -> Cluster:
    data = yaml.safe_load(default_spec_text())
    for node, addr in zip(data["nodes"], ADDRESSES):
        node["address"] = addr
    data["pooler"].update(pooler)
    c = Cluster(parse_spec(data), tmp_path / "state")
    c.ensure_secrets()
    return c


def ini(text: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, _, v in (line.partition("=") for line in text.splitlines()) if _}


def test_each_pooler_serves_its_node_in_transaction_mode_through_its_own_balancer(tmp_path):
    c = cluster(tmp_path, pool_size=7)
    state = pgbouncer.render(c.facts, c.facts.node("node2"), c.host.layout("node2"), c.secrets)
    conf, users = (f for f in state.files)
    settings = ini(conf.content)
    # the only database: Airflow's, reached through this node's HAProxy read-write port
    assert settings["airflow"] == "host=127.0.0.92 port=5000 dbname=airflow"
    assert (settings["listen_addr"], settings["listen_port"]) == ("127.0.0.92", "6432")
    assert settings["pool_mode"] == "transaction" and settings["default_pool_size"] == "7"
    assert settings["auth_type"] == "scram-sha-256" and settings["unix_socket_dir"] == ""
    assert settings["admin_users"] == c.secrets["pooler_admin"].username
    # SCRAM towards PostgreSQL needs the plain passwords: only its own user reads them
    assert c.secrets["postgres_airflow"].password in users.content and users.mode == 0o600
    assert conf.mode == 0o600
    service = state.services[0]
    assert service.reload_signal == "HUP" and service.restart_files == (conf.path,)
    if os.geteuid() == 0:
        assert service.user == users.owner == "pgbouncer"


def test_a_password_with_a_quote_stays_one_field():
    secrets = Secrets({"postgres_airflow": Account("airflow", 'pa"ss'), "pooler_admin": Account("pgbouncer", "x")})
    assert pgbouncer.userlist(secrets) == '"airflow" "pa""ss"\n"pgbouncer" "x"\n'


@pytest.mark.parametrize("field,value", [("pool_size", 0), ("max_client_conn", 5), ("pause_timeout_s", 0)])
def test_pooler_settings_are_bounded(field, value):
    data = yaml.safe_load(default_spec_text())
    data["pooler"][field] = value
    with pytest.raises(SpecError) as e:
        parse_spec(data, "test.yaml")
    assert any(line.startswith(f"pooler.{field}:") for line in e.value.details), e.value.details


def test_the_pooler_port_must_not_clash():
    data = yaml.safe_load(default_spec_text())
    data["ports"]["pooler"] = 5000
    with pytest.raises(SpecError) as e:
        parse_spec(data, "test.yaml")
    assert any(line.startswith("ports.pooler: port 5000 is also used by ports.pg_primary") or
               line.startswith("ports.pg_primary: port 5000 is also used by ports.pooler") for line in e.value.details), e.value.details


def test_a_pooler_that_does_not_pause_in_time_is_resumed_and_the_switchover_goes_on(tmp_path, monkeypatch):
    """PAUSE waits for open transactions: one that stays open must neither hold the switchover
    nor leave that pooler paused."""
    c = cluster(tmp_path, pause_timeout_s=1)
    stuck = threading.Event()
    sent: list[tuple[str, str]] = []

    def command(node, secrets, sql):
        sent.append((node.name, sql))
        if sql == "PAUSE" and node.name == "node2":
            stuck.wait(30)  # a transaction that stays open
        return True

    monkeypatch.setattr(pgbouncer, "command", command)
    t0 = time.monotonic()
    paused = pgbouncer.pause_all(c.facts, c.secrets, 0.5)
    assert time.monotonic() - t0 < 5
    assert paused == ["node1", "node3"]
    assert ("node2", "RESUME") in sent and ("node1", "RESUME") not in sent
    stuck.set()
