"""The external load balancer: the settings haflow prints, and the follow measurement of `lb check`."""

import json
import subprocess
import sys

import pytest
import yaml

from haflow import lb
from haflow.components import patroni
from haflow.facts import ClusterFacts
from haflow.secrets import Account, Secrets
from haflow.spec import default_spec_text, parse_spec

HAFLOW = [sys.executable, "-m", "haflow.cli"]


def facts(**database) -> ClusterFacts:
    data = yaml.safe_load(default_spec_text())
    data["database"].update(database)
    return ClusterFacts(parse_spec(data))


def test_settings_send_postgres_to_every_node_with_patronis_primary_check():
    s = lb.settings(facts())
    rw = next(x for x in s["services"] if x["name"] == "postgres-read-write")
    assert [t["address"] for t in rw["targets"]] == ["127.0.0.11", "127.0.0.12", "127.0.0.13"]
    assert {t["port"] for t in rw["targets"]} == {5432}
    assert {k: rw["health_check"][k] for k in ("protocol", "port", "path", "expect_status")} == {
        "protocol": "http", "port": 8008, "path": "/primary", "expect_status": 200}
    assert rw["close_connections_to_unhealthy_targets"] is True
    ro = next(x for x in s["services"] if x["name"] == "postgres-read-only")
    assert ro["health_check"]["path"] == "/replica"
    api = next(x for x in s["services"] if x["name"] == "airflow-api")
    assert api["health_check"]["path"] == "/api/v2/monitor/health" and api["targets"][0]["port"] == 8080


def test_lb_settings_json_is_what_the_module_says():
    r = subprocess.run([*HAFLOW, "lb", "settings", "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == lb.settings(facts())


@pytest.mark.parametrize("bad", ["10.0.0.1", "10.0.0.1:", ":5432", "10.0.0.1:99999", "x:y"])
def test_lb_check_refuses_a_bad_endpoint_with_exit_2(bad):
    r = subprocess.run([*HAFLOW, "lb", "check", bad], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "is not ADDRESS:PORT" in r.stderr, r.stderr


def p(at, server, rec=False):
    return lb.Probe(at, server, rec)


def test_follow_is_the_first_stable_run_on_the_new_primary():
    probes = [p(1, "a"), p(2, "b"), p(3, None, None), p(4, "b"), p(5, "b", True), p(6, "b"), p(7, "b"), p(8, "b")]
    assert lb._followed(probes, "b", since=0) == 6  # 2 alone, then an error, then a replica: not yet
    assert lb._followed(probes, "b", since=6.5) is None  # only two after that
    assert lb._followed(probes, "c", since=0) is None


def test_allowed_clients_open_postgres_to_an_external_balancers_clients_without_replication():
    f = facts(allowed_clients=["10.0.5.0/24"])
    secrets = Secrets({"postgres_replication": Account("replicator", "x")})
    hba = patroni.pg_hba(f, secrets)
    assert "host all all 10.0.5.0/24 scram-sha-256" in hba
    assert not any("replication" in line and "10.0.5.0/24" in line for line in hba)


@pytest.mark.parametrize("net, why", [("10.0.5.1/24", "host bits set"), ("nonsense", "is not a network"),
                                      ("::/0", "only IPv4")])
def test_allowed_clients_must_be_ipv4_networks(tmp_path, net, why):
    data = yaml.safe_load(default_spec_text())
    data["database"]["allowed_clients"] = [net]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    r = subprocess.run([*HAFLOW, "validate", "-f", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and why in r.stderr and "database.allowed_clients" in r.stderr, r.stderr


def test_the_labs_stand_in_balancer_is_configured_from_the_settings_alone():
    from haflow.lab import balancer

    cfg = balancer.haproxy_config(lb.settings(facts()))
    rw = cfg.split("listen postgres-read-write", 1)[1].split("\nlisten ", 1)[0]
    assert "bind *:5432" in rw and "http-check send meth GET uri /primary" in rw and "expect status 200" in rw
    assert "inter 5s fall 2 rise 2 on-marked-down shutdown-sessions" in rw and "timeout check 2s" in rw
    assert rw.count("check port 8008") == 3 and "server node2 127.0.0.12:5432" in rw
    api = cfg.split("listen airflow-api", 1)[1]
    assert "uri /api/v2/monitor/health" in api and "shutdown-sessions" not in api
