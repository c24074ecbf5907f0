"""Rendered configs are accepted by the real tools: `patroni --validate-config`, `haproxy -c`."""

import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from haflow.cluster import Cluster
from haflow.spec import default_spec_text, parse_spec
from tests.conftest import require_binary

# Addresses nothing listens on: Patroni's validator checks that its ports are free.
ADDRESSES = ["127.0.0.91", "127.0.0.92", "127.0.0.93"]


def cluster(tmp_path: Path) -> Cluster:
    data = yaml.safe_load(default_spec_text())
    for node, addr in zip(data["nodes"], ADDRESSES):
        node["address"] = addr
    c = Cluster(parse_spec(data), tmp_path / "state")
    c.ensure_secrets()  # what `up` does first
    return c


def file_of(c: Cluster, node: str, name: str):
    return next(f for f in c.desired(node).files if f.path.name == name)


@pytest.fixture
def etcd_ports_open():
    """Patroni's validator TCP-connects to each etcd host; it only needs the port to accept."""
    socks = []
    for addr in ADDRESSES:
        s = socket.socket()
        s.bind((addr, 2379))
        s.listen()
        socks.append(s)
    yield
    for s in socks:
        s.close()


def test_patroni_config_passes_patroni_validate_config(tmp_path, patroni_venv, etcd_ports_open):
    c = cluster(tmp_path)
    for node in c.facts.node_names:
        f = file_of(c, node, "patroni.yml")
        assert f.mode == 0o600  # holds passwords
        out = tmp_path / f"{node}-patroni.yml"
        out.write_text(f.content)
        r = subprocess.run([str(patroni_venv / "bin/patroni"), "--validate-config", str(out)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def test_patroni_config_has_the_measured_defaults(tmp_path):
    c = cluster(tmp_path)
    conf = yaml.safe_load(file_of(c, "node2", "patroni.yml").content)
    dcs = conf["bootstrap"]["dcs"]
    assert (dcs["ttl"], dcs["loop_wait"], dcs["retry_timeout"]) == (20, 5, 5)  # bootstrap; up sets 10
    from haflow.components.patroni import dynamic_config
    assert dynamic_config(c.facts)["loop_wait"] == 10
    assert dcs["synchronous_mode"] is True and dcs["failsafe_mode"] is True
    assert dcs["postgresql"]["use_pg_rewind"] is True
    assert conf["etcd3"]["hosts"] == [f"{a}:2379" for a in ADDRESSES]
    assert "etcd" not in conf  # v3 API only
    pg = conf["postgresql"]
    assert pg["listen"] == "127.0.0.92:5432"
    assert pg["parameters"]["unix_socket_directories"].endswith("/node2/pg")
    # pg_hba: only the cluster's addresses (+127.0.0.1, the source of loopback traffic), scram only
    hosts = [l for l in pg["pg_hba"] if l.startswith("host")]
    assert all(l.endswith("scram-sha-256") for l in pg["pg_hba"])
    assert {l.split()[3] for l in hosts} == {f"{a}/32" for a in ADDRESSES} | {"127.0.0.1/32"}


def test_haproxy_config_passes_haproxy_check(tmp_path):
    require_binary("haproxy")
    c = cluster(tmp_path)
    f = file_of(c, "node1", "haproxy.cfg")
    out = tmp_path / "haproxy.cfg"
    out.write_text(f.content)
    r = subprocess.run(["haproxy", "-c", "-f", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "option httpchk GET /primary" in f.content and "option httpchk GET /replica" in f.content
    assert "inter 1000ms fall 2 rise 1 on-marked-down shutdown-sessions" in f.content
    assert "bind 127.0.0.91:5000" in f.content and "0.0.0.0" not in f.content
    assert f.content.count("check port 8008") == 6


def backend_checks(config: str) -> dict[str, str]:
    """listen section -> its default-server line (sections with servers), from a haproxy.cfg."""
    sections = {}
    for block in config.split("\nlisten ")[1:]:
        lines = [l.strip() for l in block.splitlines() if l.strip().startswith("default-server")]
        if lines:
            sections[block.split()[0]] = lines[0]
    return sections


def test_haproxy_checks_what_writes_wait_on_every_interval_and_the_rest_calmly(tmp_path):
    """The primary (writes) and RabbitMQ (tasks) are checked at the spec's interval; replicas and
    api-servers three times less often while healthy, at the spec's interval once a check fails
    or while down, so detection of a server coming back is unchanged."""
    checks = backend_checks(file_of(cluster(tmp_path), "node1", "haproxy.cfg").content)
    every = "inter 1000ms fall 2 rise 1 on-marked-down shutdown-sessions"
    calm = "inter 3000ms fastinter 1000ms downinter 1000ms fall 2 rise 1 on-marked-down shutdown-sessions"
    assert checks == {"postgres_primary": f"default-server {every}", "rabbitmq_amqp": f"default-server {every}",
                      "postgres_replicas": f"default-server {calm}", "airflow_api": f"default-server {calm}"}


def test_etcd_config_binds_only_the_node_address(tmp_path):
    c = cluster(tmp_path)
    conf = yaml.safe_load(file_of(c, "node3", "etcd.yaml").content)
    assert conf["listen-client-urls"] == "http://127.0.0.93:2379"
    assert conf["initial-cluster"] == ",".join(f"node{i + 1}=http://{a}:2380" for i, a in enumerate(ADDRESSES))
    assert conf["enable-v2"] is False and conf["enable-grpc-gateway"] is True


def test_rendering_is_deterministic(tmp_path):
    c = cluster(tmp_path)
    first = {f.path: f.content for f in c.desired("node1").files}
    second = {f.path: f.content for f in cluster(tmp_path).desired("node1").files}
    assert first == second


def test_patroni_calls_back_to_keep_etcd_leader_off_the_primary(tmp_path):
    c = cluster(tmp_path)
    conf = yaml.safe_load(file_of(c, "node2", "patroni.yml").content)
    argv = conf["postgresql"]["callbacks"]["on_role_change"].split()
    assert argv[0].endswith("/bin/python") and argv[1].endswith("etcd_leader_away.py")
    assert argv[2].endswith("etcd-callback-login.json")
    assert argv[3:] == ["http://127.0.0.92:2379", "http://127.0.0.91:2379", "http://127.0.0.93:2379"]
    script = file_of(c, "node2", "etcd_leader_away.py")
    compile(script.content, "etcd_leader_away.py", "exec")
