"""Spec validation: every problem is reported on its own line, naming its field path."""

import copy

import pytest
import yaml

from haflow.errors import SpecError
from haflow.spec import default_spec_text, embedded_default, load_spec, parse_spec

BASE = yaml.safe_load(default_spec_text())


def problems(mutate) -> list[str]:
    data = copy.deepcopy(BASE)
    mutate(data)
    with pytest.raises(SpecError) as e:
        parse_spec(data, "test.yaml")
    return e.value.details


def test_embedded_default_is_a_valid_three_node_cluster():
    spec = embedded_default()
    assert spec.cluster == "haflow"
    assert [(n.name, n.address) for n in spec.nodes] == [
        ("node1", "127.0.0.11"), ("node2", "127.0.0.12"), ("node3", "127.0.0.13")]
    assert spec.database.synchronous_mode and spec.database.failsafe_mode
    assert (spec.database.ttl, spec.database.loop_wait, spec.database.retry_timeout) == (20, 10, 5)


def test_addresses_can_be_overridden_by_env(monkeypatch):
    monkeypatch.setenv("HAFLOW_ADDRESSES", "127.0.0.41,127.0.0.42,127.0.0.43")
    assert [n.address for n in embedded_default().nodes] == ["127.0.0.41", "127.0.0.42", "127.0.0.43"]


def test_unknown_key_names_its_path_and_the_known_keys():
    (line,) = problems(lambda d: d["nodes"][1].update(adress="1.2.3.4"))
    assert line.startswith("nodes[1].adress: unknown key")
    assert "address" in line


def test_unknown_top_level_key():
    (line,) = problems(lambda d: d.update(databse={}))
    assert line.startswith("databse: unknown key")


def test_duplicate_node_names_and_addresses():
    def dup(d):
        d["nodes"][2]["name"] = "node1"
        d["nodes"][2]["address"] = "127.0.0.11"
    lines = problems(dup)
    assert any(l.startswith("nodes[2].name: 'node1' is already used by nodes[0]") for l in lines)
    assert any(l.startswith("nodes[2].address: '127.0.0.11' is already used by nodes[0]") for l in lines)


def test_fewer_than_three_nodes():
    def two(d):
        d["nodes"] = d["nodes"][:2]
        d["etcd"]["members"] = ["node1"]
    lines = problems(two)
    assert any(l.startswith("nodes: 2 full node(s) given; an HA cluster needs at least 3") for l in lines)


def test_even_etcd_member_count():
    def four(d):
        d["nodes"].append({"name": "node4", "address": "127.0.0.14"})
        d["etcd"]["members"] = ["node1", "node2", "node3", "node4"]
    lines = problems(four)
    assert any(l.startswith("etcd.members: 4 etcd members is an even number") for l in lines)


def test_even_count_with_default_members_names_nodes():
    def four(d):
        d["nodes"].append({"name": "node4", "address": "127.0.0.14"})
        del d["etcd"]
    assert any(l.startswith("nodes: 4 etcd members is an even number") for l in problems(four))


def test_etcd_member_must_be_a_node():
    lines = problems(lambda d: d["etcd"].update(members=["node1", "node2", "nodeX"]))
    assert any(l.startswith("etcd.members[2]: 'nodeX' is not a node") for l in lines)


def test_port_clash_on_one_address():
    lines = problems(lambda d: d["ports"].update(pg_primary=5432))
    assert any(l.startswith("ports.pg_primary: port 5432 is also used by ports.postgres") for l in lines)


def test_invalid_versions():
    def bad(d):
        d["database"]["patroni_version"] = "3.3.0"
        d["database"]["postgres_version"] = 9
    lines = problems(bad)
    assert any(l.startswith("database.patroni_version: Patroni '3.3.0' is not supported") for l in lines)
    assert any(l.startswith("database.postgres_version: PostgreSQL 9 is not supported") for l in lines)


def test_patroni_timing_rules():
    assert any(l.startswith("database.ttl: 10 s is out of range; use 20-3600 s (Patroni's minimum is 20)")
               for l in problems(lambda d: d["database"].update(ttl=10)))
    assert any("loop_wait + 2*retry_timeout" in l
               for l in problems(lambda d: d["database"].update(loop_wait=15)))


def test_bad_address_and_names():
    def bad(d):
        d["nodes"][0]["address"] = "not-an-ip"
        d["nodes"][1]["name"] = "Node_2"
        d["cluster"] = "My Cluster"
    lines = problems(bad)
    assert any(l.startswith("nodes[0].address: 'not-an-ip' is not an IP address") for l in lines)
    assert any(l.startswith("nodes[1].name: 'Node_2' is not a valid node name") for l in lines)
    assert any(l.startswith("cluster: 'My Cluster' is not a valid cluster name") for l in lines)


def test_missing_required_field():
    lines = problems(lambda d: d.pop("nodes"))
    assert lines == ["nodes: required field is missing; add it"]


def test_yaml_syntax_error_names_the_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("cluster: x\nnodes: [\n  - name: a\n")
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert "line" in e.value.message and "not valid YAML" in e.value.message


def test_missing_file_says_how_to_create_one(tmp_path):
    with pytest.raises(SpecError) as e:
        load_spec(tmp_path / "nope.yaml")
    assert "haflow init" in e.value.message


def test_task_heartbeat_timeout_must_outlast_a_failover():
    assert embedded_default().airflow.task_heartbeat_timeout_s == 60
    assert any(l.startswith("airflow.task_heartbeat_timeout_s:") and "at least 45" in l
               for l in problems(lambda d: d["airflow"].update(task_heartbeat_timeout_s=20)))


def test_ssh_is_given_for_every_node_or_none():
    import yaml
    from haflow.spec import default_spec_text, parse_spec
    data = yaml.safe_load(default_spec_text())
    data["nodes"][0]["ssh"] = {"user": "admin"}
    with pytest.raises(SpecError) as e:
        parse_spec(data)
    assert e.value.details == ["nodes[1].ssh: missing while 1 other node(s) have one; a spec is all-local or all-SSH: "
                               "give every node `ssh` (for `haflow deploy`) or none (for `haflow up`)"]
    for n in data["nodes"]:
        n["ssh"] = {"user": "admin", "port": 2222, "key": "keys/lab", "host": "lab1.example"}
    spec = parse_spec(data)
    assert spec.nodes[2].ssh.port == 2222 and spec.nodes[0].ssh.user == "admin"
    data["nodes"][1]["ssh"] = {"user": "Bad User", "port": 0, "extra": 1}
    with pytest.raises(SpecError) as e:
        parse_spec(data)
    assert any(d.startswith("nodes[1].ssh.user: 'Bad User' is not a valid user name") for d in e.value.details)
    assert any(d.startswith("nodes[1].ssh.port: 0 is out of range") for d in e.value.details)
    assert any(d.startswith("nodes[1].ssh.extra") for d in e.value.details)


def test_up_refuses_an_ssh_spec_and_deploy_a_local_one(tmp_path):
    import subprocess
    import sys
    import yaml
    from haflow.spec import default_spec_text
    data = yaml.safe_load(default_spec_text())
    for n in data["nodes"]:
        n["ssh"] = {"user": "root"}
    spec = tmp_path / "ssh.yaml"
    spec.write_text(yaml.safe_dump(data))
    r = subprocess.run([sys.executable, "-m", "haflow.cli", "up", "-f", str(spec)], capture_output=True, text=True)
    assert r.returncode == 2 and "haflow deploy -f" in r.stderr and "Traceback" not in r.stderr
    local = tmp_path / "local.yaml"
    local.write_text(default_spec_text())
    r = subprocess.run([sys.executable, "-m", "haflow.cli", "deploy", "-f", str(local), "--dry-run"], capture_output=True, text=True)
    assert r.returncode == 2 and "no `ssh`" in r.stderr and "Traceback" not in r.stderr
