"""Broker and Airflow rendering: one cluster formed declaratively, shared keys, no guest,
every client going through its node's balancer."""

import base64
import os
import hashlib
import json
from pathlib import Path

import pytest
import yaml

from haflow.cluster import Cluster
from haflow.components import airflow, rabbitmq
from haflow.errors import SpecError
from haflow.spec import default_spec_text, parse_spec

ADDRESSES = ["127.0.0.91", "127.0.0.92", "127.0.0.93"]


def cluster(tmp_path: Path, **airflow_overrides) -> Cluster:
    data = yaml.safe_load(default_spec_text())
    for node, addr in zip(data["nodes"], ADDRESSES):
        node["address"] = addr
    data.setdefault("airflow", {}).update(airflow_overrides)
    c = Cluster(parse_spec(data), tmp_path / "state")
    c.ensure_secrets()  # what `up` does first
    return c


def files(c: Cluster, node: str) -> dict[str, str]:
    return {f.path.name: f.content for f in c.desired(node).files}


def service(c: Cluster, node: str, name: str):
    return next(s for s in c.desired(node).services if s.name == name)


def test_rabbitmq_cluster_is_declarative_with_no_guest(tmp_path):
    c = cluster(tmp_path)
    conf = files(c, "node2")["rabbitmq.conf"]
    assert "cluster_formation.peer_discovery_backend = classic_config" in conf
    for i, addr in enumerate(ADDRESSES):
        assert f"cluster_formation.classic_config.nodes.{i + 1} = rabbit-node{i + 1}@{addr}" in conf
    assert "cluster_partition_handling = pause_minority" in conf
    assert "listeners.tcp.1 = 127.0.0.92:5672" in conf and "management.tcp.ip = 127.0.0.92" in conf
    assert f"consumer_timeout = {8 * 3600 * 1000}" in conf
    defs = json.loads(files(c, "node2")["definitions.json"])
    assert {u["name"] for u in defs["users"]} == {"admin", "airflow"}  # no guest
    assert {"user": "airflow", "vhost": "airflow", "configure": ".*", "write": ".*", "read": ".*"} in defs["permissions"]


def test_rabbitmq_password_hash_is_rabbits_sha256_scheme():
    h = base64.b64decode(rabbitmq.password_hash("s3cret", "seed"))
    salt, digest = h[:4], h[4:]
    assert digest == hashlib.sha256(salt + b"s3cret").digest()
    assert rabbitmq.password_hash("s3cret", "seed") == rabbitmq.password_hash("s3cret", "seed")  # stable file


def test_erlang_cookie_is_shared_and_private(tmp_path):
    c = cluster(tmp_path)
    cookies = {next(f for f in c.desired(n).files if f.path.name == ".erlang.cookie") for n in c.facts.node_names}
    assert len({f.content for f in cookies}) == 1 and all(f.mode == 0o400 for f in cookies)
    env = service(c, "node3", "rabbitmq").env
    assert env["RABBITMQ_NODENAME"] == "rabbit-node3@127.0.0.93" and env["RABBITMQ_USE_LONGNAME"] == "true"
    assert env["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"] == "-kernel inet_dist_use_interface {127,0,0,93}"


def test_one_epmd_for_the_machine_on_the_node_addresses(tmp_path):
    c = cluster(tmp_path)
    (machine,) = c.host.machines()
    assert machine.nodes == tuple(c.facts.node_names)
    (epmd,) = rabbitmq.render_machine(c.facts, c.host.machine_layout(machine), machine.nodes).services
    assert epmd.argv[1:] == ("-address", ",".join(ADDRESSES), "-port", "4369")
    assert epmd.user == ("rabbitmq" if os.geteuid() == 0 else None)


def test_airflow_processes_share_keys_and_use_their_nodes_balancer(tmp_path):
    c = cluster(tmp_path)
    envs = {n: service(c, n, airflow.SCHEDULER).env for n in c.facts.node_names}
    for key in ("AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY"):
        assert len({e[key] for e in envs.values()}) == 1
    e = envs["node2"]
    assert "@127.0.0.92:5000/airflow" in e["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert e["AIRFLOW__CELERY__BROKER_URL"].endswith("@127.0.0.92:5670/airflow") and ";" not in e["AIRFLOW__CELERY__BROKER_URL"]
    assert e["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://127.0.0.92:8000/execution/"
    assert e["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert e["AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT"] == "120" and e["AIRFLOW__CORE__DEFAULT_TASK_RETRIES"] == "2"
    worker = service(c, "node2", airflow.WORKER)
    assert "--celery-hostname" in worker.argv and "node2@haflow" in worker.argv
    assert "--skip-serve-logs" in worker.argv  # log servers bind every address: off on one machine


def test_celery_config_module_declares_quorum_queues(tmp_path):
    module = files(cluster(tmp_path), "node1")["haflow_airflow.py"]
    assert '"task_default_queue_type": "quorum"' in module and '"confirm_publish": True' in module
    assert "DelayedDelivery.include_if" in module


def test_dag_processor_runs_under_the_elector(tmp_path):
    svc = service(cluster(tmp_path), "node1", airflow.DAG_PROCESSOR)
    argv = list(svc.argv)
    assert argv[1].endswith("dag_processor_elect.py")
    assert argv[argv.index("--key") + 1] == "/haflow/haflow/dag-processor"
    assert argv[-2:] == [argv[-2], "dag-processor"] and argv[argv.index("--") + 1].endswith("/bin/airflow")
    assert argv.count("--etcd") == 3


def test_consumer_timeout_must_outlast_the_task_timeout():
    data = yaml.safe_load(default_spec_text())
    data["broker"] = {"consumer_timeout_s": 3600}
    data["airflow"] = {"task_execution_timeout_s": 7200}
    with pytest.raises(SpecError) as e:
        parse_spec(data)
    assert any(l.startswith("broker.consumer_timeout_s: 3600 s does not outlast airflow.task_execution_timeout_s")
               for l in e.value.details)


def test_unsupported_airflow_version_names_the_field():
    data = yaml.safe_load(default_spec_text())
    data["airflow"] = {"version": "2.10.5"}
    with pytest.raises(SpecError) as e:
        parse_spec(data)
    assert any(l.startswith("airflow.version: Airflow '2.10.5' is not supported") for l in e.value.details)


def test_dag_folder_sync_is_atomic_and_idempotent(tmp_path):
    from haflow.fsutil import tree_checksum
    from haflow.hosts.local import LocalHost
    src = tmp_path / "dags"
    src.mkdir()
    (src / "a.py").write_text("x = 1\n")
    host = LocalHost(tmp_path / "state", "t")
    link = tmp_path / "node/airflow/dags"
    v1 = tree_checksum(src)[:12]
    assert host.put_tree("node1", src, tree_checksum(src), link) is True
    assert link.is_symlink() and (link / "a.py").read_text() == "x = 1\n"
    assert host.tree_checksum("node1", link) == tree_checksum(src)
    assert host.put_tree("node1", src, tree_checksum(src), link) is False
    (src / "a.py").write_text("x = 2\n")
    v2 = tree_checksum(src)[:12]
    assert v2 != v1 and host.put_tree("node1", src, tree_checksum(src), link) is True
    assert (link / "a.py").read_text() == "x = 2\n"
    assert sorted(p.name for p in link.parent.iterdir()) == ["dags", f"dags.{v2}"]  # old copy removed


def test_an_airflow_database_connection_gives_up_on_a_balancer_that_accepts_and_never_answers(tmp_path, monkeypatch):
    """What a balancer does with a connection opened just as the primary's server died (lab,
    power-off): it accepts and never answers. Airflow's database URL makes libpq give up."""
    import re
    import socket
    import threading

    import psycopg

    monkeypatch.setattr(airflow, "DB_CONNECT_TIMEOUT_S", 1)
    url = service(cluster(tmp_path), "node1", airflow.SCHEDULER).env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # the kernel accepts; nothing ever answers
    url = re.sub(r"@[^/@]+/", f"@127.0.0.1:{silent.getsockname()[1]}/", url.replace("postgresql+psycopg", "postgresql"))
    errors: list[Exception] = []

    def connect() -> None:
        try:
            psycopg.connect(url)
        except psycopg.OperationalError as e:
            errors.append(e)

    attempt = threading.Thread(target=connect, daemon=True)
    attempt.start()
    attempt.join(30)
    silent.close()
    assert not attempt.is_alive(), "the connection attempt still hangs"
    assert errors and "timeout" in str(errors[0]).lower(), errors
