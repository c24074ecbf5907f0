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
    # the database through the node's pooler, which alone knows no prepared statements
    assert "@127.0.0.92:6432/airflow" in e["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert e["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC"] == e["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert e["AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS"] == "haflow_airflow.POOLED_CONNECT_ARGS"
    assert e["AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS_ASYNC"] == "haflow_airflow.POOLED_CONNECT_ARGS"
    # ... but the migration holds a session-level advisory lock: straight to the balancer
    layout = c.host.layout("node2")
    migrate = airflow.migrate_env(c.facts, c.facts.node("node2"), layout, c.secrets)
    assert "@127.0.0.92:5000/airflow" in migrate["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert "@127.0.0.92:5000/airflow" in e["HAFLOW_CANARY_DSN"]
    assert e["AIRFLOW__CELERY__BROKER_URL"].endswith("@127.0.0.92:5670/airflow") and ";" not in e["AIRFLOW__CELERY__BROKER_URL"]
    assert e["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://127.0.0.92:8000/execution/"
    assert e["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert e["AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT"] == "120" and e["AIRFLOW__CORE__DEFAULT_TASK_RETRIES"] == "2"
    worker = service(c, "node2", airflow.WORKER)
    assert "--celery-hostname" in worker.argv and "node2@haflow" in worker.argv
    assert "--skip-serve-logs" in worker.argv  # log servers bind every address: off on one machine


def test_idle_airflow_sleeps_between_empty_scheduler_loops_and_keeps_no_bundle_cleaner(tmp_path):
    """Measured idle costs (docs/benchmarks.md): an idle scheduler loop every second, and a
    whole interpreter per worker that only cleans versioned DAG bundles, which haflow has none of."""
    c = cluster(tmp_path)
    assert service(c, "node1", airflow.SCHEDULER).env["AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME"] == "2"
    assert service(c, "node1", airflow.WORKER).env["AIRFLOW__DAG_PROCESSOR__STALE_BUNDLE_CLEANUP_INTERVAL"] == "0"


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


# --- the partition guard (data/rabbitmq_guard.py) --------------------------------------------


def _data_module(script: str):
    """A script haflow installs on the nodes (src/haflow/data), loaded as a module."""
    import importlib.util
    from importlib import resources
    path = resources.files("haflow").joinpath("data", script)
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _guard_module():
    return _data_module(rabbitmq.GUARD_SCRIPT)


def test_the_partition_guard_runs_beside_each_rabbitmq_node_with_its_password_out_of_argv(tmp_path):
    c = cluster(tmp_path)
    guard, server = service(c, "node2", rabbitmq.GUARD), service(c, "node2", rabbitmq.NAME)
    password = c.secrets["rabbitmq_admin"].password
    assert guard.user == server.user and guard.after == (rabbitmq.NAME,)
    assert password not in " ".join(guard.argv) and guard.env[rabbitmq.GUARD_PASSWORD_ENV] == password
    assert guard.env["RABBITMQ_NODENAME"] == server.env["RABBITMQ_NODENAME"] == "rabbit-node2@127.0.0.92"
    argv = list(guard.argv)
    peers = [argv[i + 1] for i, a in enumerate(argv) if a == "--peer"]
    assert peers == ["http://127.0.0.91:15672", "http://127.0.0.93:15672"]
    assert argv[argv.index("--members") + 1] == "3" and argv[argv.index("--url") + 1] == "http://127.0.0.92:15672"


def test_the_guard_acts_only_outside_a_majority_that_it_can_reach():
    outside = _guard_module().outside_majority
    me, a, b = "rabbit-2", "rabbit-1", "rabbit-3"
    # the stuck split of the lab's node-partition drill: it runs alone, its peers run together
    assert outside(me, {me}, [{a, b}, {a, b}], 3)
    assert outside(me, {me}, [None, {a, b}], 3)  # one peer answering is enough
    assert not outside(me, None, [{a, b}], 3)  # paused (its API is down): pause_minority's business
    assert not outside(me, {me, a, b}, [{me, a, b}], 3)  # healthy
    assert not outside(me, {me, b}, [{me, b}], 3)  # a peer is down: still a majority
    assert not outside(me, {me}, [None, None], 3)  # cut off: the majority cannot be reached
    assert not outside(me, {me}, [{a}, {b}], 3)  # every node alone: nobody holds a majority
    assert not outside(me, {me}, [{me, a, b}], 3)  # a peer still counts it in: not a split
    assert not outside(me, {me, a}, [{b, "rabbit-4"}], 4)  # 2 + 2: no majority anywhere


def test_the_guard_restarts_its_rabbitmq_application_after_the_grace_and_never_when_healthy(tmp_path):
    """The guard's loop against two management APIs (stand-in HTTP servers) and a recording
    rabbitmqctl: outside the majority it runs stop_app then start_app, without the password."""
    import http.server
    import subprocess
    import sys
    import threading

    def api(running: list[str]) -> http.server.ThreadingHTTPServer:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                ok = self.path.startswith("/api/nodes") and self.headers.get("Authorization", "").startswith("Basic ")
                body = json.dumps([{"name": n, "running": True} for n in running]).encode()
                self.send_response(200 if ok else 401)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    ctl = tmp_path / "rabbitmqctl"
    calls = tmp_path / "calls"
    ctl.write_text(f'#!/bin/sh\necho "$1 ${{HAFLOW_RABBITMQ_PASSWORD:-no-password}}" >> {calls}\n')
    ctl.chmod(0o755)
    script = str(Path(_guard_module().__file__))

    def run(mine: list[str], peer: list[str], seconds: float) -> list[str]:
        servers = [api(mine), api(peer)]
        urls = [f"http://127.0.0.1:{s.server_address[1]}" for s in servers]
        argv = [sys.executable, script, "--node", "rabbit-2", "--url", urls[0], "--peer", urls[1], "--members", "3",
                "--ctl", str(ctl), "--user", "admin", "--interval", "0.1", "--grace", "0.5"]
        proc = subprocess.Popen(argv, env={**os.environ, "HAFLOW_RABBITMQ_PASSWORD": "s3cret"}, stdout=subprocess.PIPE, text=True)
        try:
            proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            proc.terminate()
        out = proc.communicate(timeout=10)[0]
        for s in servers:
            s.shutdown()
        return out.splitlines()

    log = run(["rabbit-1", "rabbit-2", "rabbit-3"], ["rabbit-1", "rabbit-2", "rabbit-3"], 2)
    assert not calls.exists(), log
    log = run(["rabbit-2"], ["rabbit-1", "rabbit-3"], 2.5)
    assert calls.read_text().splitlines()[:2] == ["stop_app no-password", "start_app no-password"], log
    assert any("restarting the RabbitMQ application" in line for line in log), log


def test_airflow_processes_skip_the_final_garbage_collection_and_keep_exit_codes_and_atexit(tmp_path):
    """data/sitecustomize.py sits on every Airflow process's PYTHONPATH. A real interpreter
    with it: atexit handlers run and the exit code stays; the final collection (which cost an
    api-server 2.3 s of CPU at every stop) is skipped, seen as a cycle's finalizer not running."""
    import subprocess
    import sys
    c = cluster(tmp_path)
    for svc in (airflow.API, airflow.SCHEDULER, airflow.WORKER):
        path = Path(service(c, "node1", svc).env["PYTHONPATH"]) / airflow.SITE_MODULE
        assert any(f.path == path for f in c.desired("node1").files), svc
    program = ("import atexit, sys\n"
               "class Cycle:\n    def __del__(self): print('collected', flush=True)\n"
               "a = Cycle(); a.me = a; del a\n"
               "atexit.register(lambda: print('atexit ran', flush=True))\nsys.exit(3)\n")
    site = tmp_path / "site"
    site.mkdir()
    (site / airflow.SITE_MODULE).write_text(next(f.content for f in c.desired("node1").files if f.path.name == airflow.SITE_MODULE))

    def run(pythonpath: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", program], env={"PYTHONPATH": pythonpath, "PATH": os.environ["PATH"]},
                              capture_output=True, text=True, timeout=60)
    plain, fast = run(""), run(str(site))
    assert plain.returncode == fast.returncode == 3
    assert "collected" in plain.stdout and "atexit ran" in plain.stdout
    assert "collected" not in fast.stdout and "atexit ran" in fast.stdout, fast


def test_an_idle_worker_keeps_one_task_process_and_grows_to_its_concurrency(tmp_path):
    """Idle, each worker held worker_concurrency forked task processes of ~100 MiB each
    (docs/benchmarks.md, idle); Celery's autoscaler keeps worker_idle_processes of them."""
    argv = list(service(cluster(tmp_path), "node1", airflow.WORKER).argv)
    assert argv[argv.index("--autoscale") + 1] == "3,1" and argv[argv.index("--concurrency") + 1] == "3"
    fixed = list(service(cluster(tmp_path / "b", worker_idle_processes=3), "node1", airflow.WORKER).argv)
    assert "--autoscale" not in fixed  # as many idle as busy: a fixed pool


def test_idle_task_processes_cannot_exceed_the_concurrency():
    data = yaml.safe_load(default_spec_text())
    data["airflow"] = {"worker_concurrency": 2, "worker_idle_processes": 3}
    with pytest.raises(SpecError) as e:
        parse_spec(data)
    assert any("worker_idle_processes (3) exceeds worker_concurrency (2)" in l for l in e.value.details), e.value.details


class _FakeEtcd:
    """The elector's etcd client, recording each call; the key is held by `holder` until a test
    sets it to None (the holder's lease expired)."""

    def __init__(self, holder: str | None):
        self.holder, self.calls = holder, []

    def post(self, path: str, body: dict) -> dict:
        self.calls.append(path)
        if path == "/v3/kv/range":
            return {"kvs": [{"value": base64.b64encode(self.holder.encode()).decode()}]} if self.holder else {}
        if path == "/v3/lease/grant":
            return {"ID": "7"}
        if path == "/v3/kv/txn":
            return {"succeeded": self.holder is None}
        return {}


def test_a_standby_elector_only_reads_the_key_and_races_once_it_is_gone(monkeypatch):
    """Each race is three entries in etcd's log (grant, txn, revoke) on every member; standbys
    raced every second, most of an idle cluster's etcd work (6.4 commits/s, docs/benchmarks.md)."""
    mod = _data_module(airflow.ELECTOR)
    etcd = _FakeEtcd(holder="node1")
    elector = mod.Elector(etcd, "/k", "node2", 10, ["true"])
    ticks = []

    def sleep(_s):
        ticks.append(1)
        if len(ticks) == 3:
            etcd.holder = None  # node1's lease expired
        if len(ticks) == 5:
            elector.stopping = True

    monkeypatch.setattr(mod.time, "sleep", sleep)
    monkeypatch.setattr(mod.Elector, "lead", lambda self: setattr(self, "stopping", True))
    elector.run()
    first_race = etcd.calls.index("/v3/lease/grant")
    assert set(etcd.calls[:first_race]) == {"/v3/kv/range"} and first_race == 4, etcd.calls
    assert etcd.calls[first_race:] == ["/v3/lease/grant", "/v3/kv/txn"] and elector.lease == "7"
