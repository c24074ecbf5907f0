"""Worker-only nodes (`nodes[].roles: [worker]`): a Celery worker behind its own balancer, in no
quorum. What the spec accepts, and what every component renders, provisions and probes for one."""

import subprocess
from pathlib import Path

import pytest
import yaml

from haflow.cluster import Cluster
from haflow.components import airflow, rabbitmq
from haflow.drills import scenarios
from haflow.errors import SpecError
from haflow.hosts.base import Machine
from haflow.lb import settings
from haflow.spec import default_spec_text, parse_spec
from tests.conftest import require_binary

ADDRESSES = ["127.0.0.91", "127.0.0.92", "127.0.0.93"]
WORKER = {"name": "w1", "address": "127.0.0.94", "roles": ["worker"]}


def spec_data(*extra: dict) -> dict:
    data = yaml.safe_load(default_spec_text())
    for node, addr in zip(data["nodes"], ADDRESSES):
        node["address"] = addr
    data["nodes"] += [dict(e) for e in extra]
    return data


def cluster(tmp_path: Path, *extra: dict) -> Cluster:
    c = Cluster(parse_spec(spec_data(*extra)), tmp_path / "state")
    c.ensure_secrets()
    return c


def spec_problems(data: dict) -> list[str]:
    with pytest.raises(SpecError) as e:
        parse_spec(data, "test.yaml")
    return e.value.details


# --- the spec ---------------------------------------------------------------------------------


def test_a_worker_only_node_is_accepted_and_joins_no_quorum(tmp_path):
    spec = parse_spec(spec_data(WORKER))
    assert [n.name for n in spec.full_nodes] == ["node1", "node2", "node3"]
    assert [n.name for n in spec.etcd_members] == ["node1", "node2", "node3"]  # 3 members, not an even 4
    assert spec.node("w1").worker_only and not spec.node("node1").worker_only


def test_roles_other_than_full_or_worker_only_are_refused_with_the_fix():
    lines = spec_problems(spec_data({**WORKER, "roles": ["worker", "broker"]}))
    assert any(l.startswith("nodes[3].roles: worker, broker: a node is either full") for l in lines), lines
    lines = spec_problems(spec_data({**WORKER, "roles": ["scheduler"]}))
    assert any("'scheduler' is not a role; roles are database, broker, airflow, worker" in l for l in lines), lines
    lines = spec_problems(spec_data({**WORKER, "roles": ["worker", "worker"]}))
    assert any("a role is listed twice" in l for l in lines), lines


def test_workers_do_not_count_towards_the_three_full_nodes():
    data = spec_data(WORKER, {**WORKER, "name": "w2", "address": "127.0.0.95"})
    data["nodes"] = data["nodes"][1:]  # 2 full nodes + 2 workers
    lines = spec_problems(data)
    assert any(l.startswith("nodes: 2 full node(s) given; an HA cluster needs at least 3") for l in lines), lines


def test_an_etcd_member_on_a_worker_only_node_is_refused():
    data = spec_data(WORKER)
    data["etcd"]["members"] = ["node1", "node2", "w1"]
    lines = spec_problems(data)
    assert any(l.startswith("etcd.members[2]: w1 is a worker-only node") for l in lines), lines


# --- what it runs -----------------------------------------------------------------------------


def test_a_worker_only_node_runs_its_balancer_and_a_celery_worker_only(tmp_path):
    c = cluster(tmp_path, WORKER)
    # the pooler too: the worker writes Celery results to the database through it
    assert [s.name for s in c.desired("w1").services] == ["haproxy", "pgbouncer", airflow.WORKER]
    full = [s.name for s in c.desired("node1").services]
    assert {"etcd", "patroni", "rabbitmq", airflow.SCHEDULER, airflow.WORKER} <= set(full)
    # its ports: the balancer's, the pooler's and the worker's log server, nothing of a quorum
    ports = set(c.facts.listen_ports("w1").values())
    assert ports == {"ports.pg_primary", "ports.pg_replicas", "ports.haproxy_stats", "ports.amqp_balancer",
                     "ports.api_balancer", "ports.pooler", "ports.worker_log_server"}, ports
    assert ("127.0.0.94", c.spec.ports.epmd) not in c.facts.host_listen_ports()


def test_balancers_route_to_full_nodes_only_and_a_workers_balancer_to_them_all(tmp_path):
    require_binary("haproxy")
    c = cluster(tmp_path, WORKER)
    for node in ("node1", "w1"):
        conf = next(f for f in c.desired(node).files if f.path.name == "haproxy.cfg").content
        assert "server w1" not in conf, conf
        assert conf.count("check port 8008") == 6 and conf.count("server node") == 12
        out = tmp_path / f"{node}.cfg"
        out.write_text(conf)
        r = subprocess.run(["haproxy", "-c", "-f", str(out)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    # a worker's AMQP port tries the RabbitMQ nodes round the ring like the others
    assert [n.name for n in c.facts.rabbit_peers_in_order("w1")] == ["node1", "node2", "node3"]
    assert [n.name for n in c.facts.rabbit_peers_in_order("node2")] == ["node2", "node3", "node1"]


def test_the_broker_and_database_are_formed_by_full_nodes_only(tmp_path):
    c = cluster(tmp_path, WORKER)
    conf = next(f for f in c.desired("node1").files if f.path.name == "rabbitmq.conf").content
    assert "rabbit-w1@" not in conf and "rabbit-node3@" in conf
    assert rabbitmq.render_machine(c.facts, c.host.layout("w1"), ("w1",)).services == []
    # PostgreSQL admits the worker's balancer
    patroni_conf = yaml.safe_load(next(f for f in c.desired("node1").files if f.path.name == "patroni.yml").content)
    assert any("127.0.0.94/32" in line for line in patroni_conf["postgresql"]["pg_hba"]), patroni_conf["postgresql"]["pg_hba"]


def test_a_worker_machine_is_provisioned_with_what_its_node_runs(tmp_path):
    c = cluster(tmp_path, WORKER)
    worker = c.needs(Machine("w1", ("w1",)))
    full = c.needs(Machine("node1", ("node1",)))
    assert {p.apt for p in worker.packages} == {"haproxy", "pgbouncer"}, worker.packages
    assert {"etcd-server", "rabbitmq-server", "haproxy"} <= {p.apt for p in full.packages}
    assert [v.path.name for v in worker.venvs] == [f"airflow-{c.spec.airflow.version}"]


def test_the_external_balancer_targets_full_nodes_only(tmp_path):
    c = cluster(tmp_path, WORKER)
    for service in settings(c.facts)["services"]:
        assert [t["node"] for t in service["targets"]] == ["node1", "node2", "node3"], service


def test_a_node_partition_drill_needs_control_of_full_nodes_only(tmp_path):
    data = spec_data()
    for n in data["nodes"]:
        n["ssh"] = {"host": n["address"]}
        n["control"] = {"isolate": ["true"], "heal": ["true"]}
    data["nodes"].append({**WORKER, "ssh": {"host": WORKER["address"]}})
    assert "node-partition" in scenarios.runnable(parse_spec(data))
