"""The whole HA Airflow cluster for real: etcd, Patroni/PostgreSQL, HAProxy, RabbitMQ and
Airflow 3 on three nodes of this machine, driven through the `haflow` CLI. Faults are SIGKILLs of
real processes while a 20-task DAG runs; every run must still succeed with no task lost.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from haflow.cluster import Cluster
from haflow.components import airflow, airflow_api, rabbitmq
from haflow.spec import default_spec_text, load_spec
from tests.conftest import keep_logs_of_failure

pytestmark = pytest.mark.integration

ADDRESSES = ["127.0.0.41", "127.0.0.42", "127.0.0.43"]
HAFLOW = [sys.executable, "-m", "haflow.cli"]
EXAMPLES = Path(__file__).resolve().parents[2] / "src/haflow/examples/dags"


# A task that writes its own environment and user where the test can read them.
ENV_PROBE_DAG = """
import json, os, pwd
import pendulum
from airflow.sdk import dag, task, get_current_context

@dag(dag_id="haflow_env_probe", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
def probe():
    @task
    def dump():
        out = get_current_context()["dag_run"].conf["out"]
        with open(out, "w") as f:
            json.dump({"user": pwd.getpwuid(os.geteuid()).pw_name, "env": dict(os.environ)}, f)
    dump()

probe()
"""


def haflow(env, *args, check=True, timeout=900):
    r = subprocess.run([*HAFLOW, *args, "-f", str(env["spec"])], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"haflow {' '.join(args)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}\n"
                             + keep_logs_of_failure(env["root"] / ".haflow"))
    return r


@pytest.fixture(scope="module")
def env():
    root = Path(tempfile.mkdtemp(prefix="haflow-af-", dir="/var/tmp"))
    root.chmod(0o755)
    dags = root / "dags"
    shutil.copytree(EXAMPLES, dags, ignore=shutil.ignore_patterns("__pycache__"))
    (dags / "haflow_env_probe.py").write_text(ENV_PROBE_DAG)
    drop = root / "drop"  # where the env probe task writes what it sees (it runs as a service user)
    drop.mkdir()
    drop.chmod(0o1777)
    data = yaml.safe_load(default_spec_text())
    data["cluster"] = "aftest"
    for node, addr in zip(data["nodes"], ADDRESSES):
        node["address"] = addr
    data["airflow"]["dags"] = "dags"
    data["ports"]["epmd"] = 4371  # its own epmd: a developer's cluster may hold 4369
    spec_path = root / "cluster.yaml"
    spec_path.write_text(yaml.safe_dump(data))
    cluster = Cluster(load_spec(spec_path), root / ".haflow", spec_dir=root)
    yield {"spec": spec_path, "cluster": cluster, "root": root, "dags": dags}
    subprocess.run([*HAFLOW, "down", "-f", str(spec_path)], capture_output=True, timeout=600)
    cluster.kill_all()
    shutil.rmtree(root, ignore_errors=True)
    cluster.host.purge()  # the state dir and what lives outside it (DB, service folders, sockets)


def status(env) -> dict:
    return json.loads(haflow(env, "status", "--json", check=False).stdout)


def wait_healthy(env, timeout=240) -> dict:
    deadline = time.time() + timeout
    snap = {}
    while time.time() < deadline:
        snap = status(env)
        if snap["healthy"]:
            return snap
        time.sleep(3)
    raise AssertionError(f"cluster not healthy after {timeout}s: {snap.get('layers', {}).get('airflow', {}).get('problems')}")


def run_under_fault(env, fault) -> dict:
    """Run the 20-task DAG; `fault()` strikes a few seconds in. Returns the run's result."""
    cluster: Cluster = env["cluster"]
    result: dict = {}

    def run():
        try:
            result.update(airflow_api.run_dag(airflow_api.connect(cluster.facts, cluster.secrets), "haflow_fanout", 600))
        except Exception as e:  # reported by assert_no_task_lost
            result["error"] = repr(e)

    t = threading.Thread(target=run)
    t.start()
    time.sleep(8)
    fault()
    t.join(timeout=660)
    return result


def assert_no_task_lost(env, result):
    assert result["state"] == "success", result
    client = airflow_api.connect(env["cluster"].facts, env["cluster"].secrets)
    tis = client.task_instances("haflow_fanout", result["run_id"])
    assert len(tis) == 21 and all(ti["state"] == "success" for ti in tis), [(ti["task_id"], ti.get("map_index"), ti["state"]) for ti in tis]


def test_up_runs_the_example_dag_on_several_nodes(env):
    r = haflow(env, "up", "--json")
    out = json.loads(r.stdout)
    ex = out["up"]["example_dag"]
    assert ex["state"] == "success"
    assert len(ex["nodes"]) >= 2, ex  # Celery spread the tasks over workers of several nodes
    snap = out["status"]
    assert snap["healthy"] is True, snap["layers"]["airflow"]["problems"]
    af = snap["layers"]["airflow"]
    assert len(af["schedulers"]) == 3 and len(af["triggerers"]) == 3 and len(af["dag_processors"]) == 1
    assert af["dag_processor_holder"] in env["cluster"].facts.node_names
    assert sorted(af["workers"]) == [f"node{i}@aftest" for i in (1, 2, 3)]
    assert af["dags"]["agree"] and af["dags"]["current"]
    assert af["endpoints"]["api"] == [f"http://{a}:8000/" for a in ADDRESSES]


def test_every_shipped_dag_succeeds_when_triggered_by_hand(env):
    """What haflow puts into a DAG folder (the examples, the canary with its own table) works
    outside any drill, triggered as a user would."""
    shipped = sorted(p.stem for p in EXAMPLES.glob("*.py"))
    assert "haflow_canary" in shipped and "haflow_example" in shipped
    for dag_id in sorted(shipped, key=lambda d: d != "haflow_canary"):  # the canary first: no table exists yet
        r = haflow(env, "dags", "trigger", dag_id, "--json", check=False, timeout=900)
        assert r.returncode == 0, (dag_id, r.stdout[-2000:], r.stderr[-2000:])
        assert json.loads(r.stdout)["state"] == "success", dag_id


def test_every_airflow_queue_is_a_quorum_queue_and_there_is_no_guest(env):
    cluster: Cluster = env["cluster"]
    broker = status(env)["layers"]["broker"]
    names = {q["name"] for q in broker["quorum_queues"]}
    assert "default" in names
    default = next(q for q in broker["quorum_queues"] if q["name"] == "default")
    assert default["members"] == 3 and default["online"] == 3
    # the only classic queues are Celery's own transient ones (pidbox, events, replies)
    assert all(q.endswith("pidbox") or q.startswith("celeryev") or "reply" in q for q in broker["classic_queues"])
    assert not any(q.startswith("celery_delayed") for q in names)  # native delayed delivery kept off
    node = cluster.facts.nodes[0]
    r = httpx.get(f"{node.rabbitmq_management_url}/api/overview", auth=("guest", "guest"), timeout=5)
    assert r.status_code == 401
    users = httpx.get(f"{node.rabbitmq_management_url}/api/users", timeout=5,
                      auth=(cluster.secrets["rabbitmq_admin"].username, cluster.secrets["rabbitmq_admin"].password)).json()
    assert "guest" not in {u["name"] for u in users}


def test_secrets_files_are_0600(env):
    cluster: Cluster = env["cluster"]
    state = env["root"] / ".haflow"
    paths = [state / "secrets.yaml"]
    for n in cluster.facts.node_names:
        layout = cluster.host.layout(n)
        paths += [layout.services / "rabbitmq/definitions.json", layout.services / "rabbitmq/.erlang.cookie",
                  layout.services / "haproxy.cfg", layout.db_root / "patroni.yml", layout.db_root / "etcd-callback-login.json"]
    for path in paths:
        assert path.stat().st_mode & 0o077 == 0, path  # and they exist
    assert state.stat().st_mode & 0o077 == 0  # the state directory is private
    shown = json.loads(haflow(env, "secrets", "show", "--json").stdout)
    assert shown["airflow_admin"]["username"] == "admin" and shown["rabbitmq_airflow"]["password"]


def test_the_ui_answers_on_the_printed_url_with_the_printed_credentials(env):
    cluster: Cluster = env["cluster"]
    r = haflow(env, "up", "--no-smoke")
    url = next(line.split("Airflow UI: ")[1].split()[0] for line in r.stdout.splitlines() if line.startswith("Airflow UI: "))
    assert url == cluster.facts.api_urls[0]
    page = httpx.get(url, timeout=10, follow_redirects=True)
    assert page.status_code == 200 and "<html" in page.text.lower()
    creds = json.loads(haflow(env, "secrets", "show", "--json").stdout)["airflow_admin"]
    login = httpx.post(f"{url}auth/token", json={"username": creds["username"], "password": creds["password"]}, timeout=10)
    assert login.status_code in (200, 201) and login.json()["access_token"]
    wrong = httpx.post(f"{url}auth/token", json={"username": creds["username"], "password": "wrong"}, timeout=10)
    assert wrong.status_code == 401


@pytest.mark.skipif(os.geteuid() != 0, reason="service users exist only when haflow runs as root")
def test_no_process_but_the_supervisors_runs_as_root(env):
    cluster: Cluster = env["cluster"]
    users: dict[str, set[str]] = {}
    for node in ["_host", *cluster.facts.node_names]:
        agent = cluster.host.agent(node)
        assert agent is not None and agent.process().username() == "root"
        for ref in cluster.host.processes(node):
            p = ref.process()
            if p is not None and ref.pid != agent.pid:
                users.setdefault(p.username(), set()).add(p.name())
    assert "root" not in users, users["root"]
    assert {"etcd", "postgres", "haproxy", "rabbitmq", "airflow", "airflow-worker"} <= set(users), users
    assert "etcd" in users["etcd"] and "haproxy" in users["haproxy"] and "beam.smp" in users["rabbitmq"]
    assert "epmd" in users["rabbitmq"]
    for n in cluster.facts.node_names:  # each service's folder is its own user's, closed to others
        layout = cluster.host.layout(n)
        for folder, owner in ((layout.etcd_data, "etcd"), (layout.services / "rabbitmq", "rabbitmq"),
                              (airflow.home(layout), "airflow"), (airflow.worker_home(layout), "airflow-worker"),
                              (layout.pg_data, "postgres")):
            st = folder.stat()
            assert pwd.getpwuid(st.st_uid).pw_name == owner and st.st_mode & 0o077 == 0, folder


def test_etcd_refuses_anonymous_writes_and_confines_each_service_user(env):
    cluster: Cluster = env["cluster"]
    url = cluster.facts.etcd_members[0].etcd_client_url
    key = lambda k: base64.b64encode(k.encode()).decode()  # noqa: E731
    leader_key = f"/haflow/{cluster.facts.patroni_scope}/leader"
    anonymous = httpx.post(f"{url}/v3/kv/put", json={"key": key(leader_key), "value": key("intruder")}, timeout=5)
    assert anonymous.status_code != 200 and "user name is empty" in anonymous.text

    def login(account: str) -> dict:
        a = cluster.secrets[account]
        r = httpx.post(f"{url}/v3/auth/authenticate", json={"name": a.username, "password": a.password}, timeout=5)
        assert r.status_code == 200, r.text
        return {"Authorization": r.json()["token"]}

    patroni, elector = login("etcd_patroni"), login("etcd_elector")
    mine = httpx.post(f"{url}/v3/kv/range", json={"key": key(leader_key)}, headers=patroni, timeout=5)
    assert mine.status_code == 200 and mine.json()["kvs"]  # Patroni reads its own namespace
    for headers, k in ((patroni, "/elsewhere"), (elector, leader_key), (elector, "/elsewhere")):
        r = httpx.post(f"{url}/v3/kv/put", json={"key": key(k), "value": key("x")}, headers=headers, timeout=5)
        assert "permission denied" in r.text, (k, r.text)
    wrong = httpx.post(f"{url}/v3/auth/authenticate", json={"name": "root", "password": "wrong"}, timeout=5)
    assert wrong.status_code != 200


def etcd_proposals_per_s(cluster: Cluster, window_s: float = 15.0) -> float:
    """Entries etcd commits to its log per second (every member writes and fsyncs each one)."""
    url = f"{cluster.facts.etcd_members[0].etcd_client_url}/metrics"

    def committed() -> float:
        line = next(l for l in httpx.get(url, timeout=5).text.splitlines()
                    if l.startswith("etcd_server_proposals_committed_total"))
        return float(line.split()[-1])

    before = committed()
    time.sleep(window_s)
    return (committed() - before) / window_s


def test_an_idle_cluster_writes_almost_nothing_to_etcd(env):
    # Patroni's leader and member keys, once per loop_wait each (~0.4/s); the dag-processor's
    # standby electors only read its key (they wrote three entries a second each: 6.4/s)
    rate = etcd_proposals_per_s(env["cluster"])
    assert rate < 1.5, f"etcd commits {rate:.1f} proposals/s on an idle cluster"


def test_ui_and_api_log_in_through_the_fab_auth_manager(env):
    cluster: Cluster = env["cluster"]
    admin = cluster.secrets["airflow_admin"]
    base = f"http://{cluster.facts.nodes[2].airflow_api}"
    token = httpx.post(f"{base}/auth/token", json={"username": admin.username, "password": admin.password}, timeout=10)
    assert token.status_code == 201
    users = httpx.get(f"{base}/auth/fab/v1/users", headers={"Authorization": f"Bearer {token.json()['access_token']}"},
                      timeout=10)
    assert users.status_code == 200, users.text  # FAB's own user API: only the FAB auth manager has it
    assert admin.username in {u["username"] for u in users.json()["users"]}
    with httpx.Client(timeout=10, follow_redirects=True) as ui:  # the UI's login form, as a browser posts it
        page = ui.get(f"{base}/auth/login/")
        csrf = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page.text)
        assert page.status_code == 200 and csrf, page.text[:300]
        bad = ui.post(f"{base}/auth/login/", data={"username": admin.username, "password": "wrong", "csrf_token": csrf.group(1)})
        assert "_token" not in ui.cookies
        page = ui.get(f"{base}/auth/login/")
        csrf = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page.text)
        ok = ui.post(f"{base}/auth/login/", data={"username": admin.username, "password": admin.password,
                                                  "csrf_token": csrf.group(1)})
        assert ok.status_code == 200 and "/auth/login" not in str(ok.url) and "_token" in ui.cookies, (bad.url, ok.url)


def test_a_task_cannot_read_the_clusters_keys_or_admin_passwords_from_its_environment(env):
    cluster: Cluster = env["cluster"]
    out = env["root"] / "drop" / "env.json"
    client = airflow_api.connect(cluster.facts, cluster.secrets)
    deadline = time.time() + 180
    while client.get("/dags/haflow_env_probe").status_code != 200 and time.time() < deadline:
        time.sleep(2)
    run = client.trigger("haflow_env_probe", {"out": str(out)})
    while client.run_state("haflow_env_probe", run) not in ("success", "failed") and time.time() < deadline + 120:
        time.sleep(1)
    seen = json.loads(out.read_text())
    # not the scheduler's user: a task cannot read its /proc/PID/environ (which holds the keys)
    assert seen["user"] == ("airflow-worker" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name)
    values = "\n".join(seen["env"].values())
    s = cluster.secrets
    forbidden = {name: s.key(name) for name in ("airflow_fernet_key", "airflow_jwt_secret", "airflow_api_secret_key")}
    forbidden |= {name: s[name].password for name in ("postgres_superuser", "postgres_replication", "postgres_rewind",
                                                      "rabbitmq_admin", "etcd_root", "etcd_patroni", "etcd_elector",
                                                      "patroni_restapi", "airflow_admin")}
    leaked = [name for name, secret in forbidden.items() if secret in values]
    assert leaked == []
    assert s["postgres_airflow"].password in values  # the probe can fail: it does see what tasks get


def test_a_token_from_one_api_server_works_on_another(env):
    cluster: Cluster = env["cluster"]
    a, b = cluster.facts.nodes[0], cluster.facts.nodes[1]
    admin = cluster.secrets["airflow_admin"]
    token = httpx.post(f"http://{a.airflow_api}/auth/token", json={"username": admin.username, "password": admin.password},
                       timeout=10).json()["access_token"]
    r = httpx.get(f"http://{b.airflow_api}/api/v2/dags", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 200 and r.json()["total_entries"] >= 3


def test_run_survives_killing_the_rabbitmq_node_the_workers_use(env):
    cluster: Cluster = env["cluster"]
    facts = cluster.facts
    admin = cluster.secrets["rabbitmq_admin"]
    conns = httpx.get(f"{facts.nodes[0].rabbitmq_management_url}/api/connections", auth=(admin.username, admin.password),
                      timeout=5).json()
    by_node: dict[str, int] = {}
    for c in conns:
        node = facts.node_of_rabbit(c.get("node"))
        by_node[node] = by_node.get(node, 0) + 1
    victim = max(by_node, key=by_node.get)
    result = run_under_fault(env, lambda: cluster.host.kill_service(victim, rabbitmq.NAME))
    assert_no_task_lost(env, result)
    wait_healthy(env)


def test_run_survives_killing_a_scheduler(env):
    cluster: Cluster = env["cluster"]
    result = run_under_fault(env, lambda: cluster.host.kill_service("node2", airflow.SCHEDULER))
    assert_no_task_lost(env, result)
    wait_healthy(env)


def test_run_survives_killing_an_api_server(env):
    cluster: Cluster = env["cluster"]
    result = run_under_fault(env, lambda: cluster.host.kill_service("node1", airflow.API))
    assert_no_task_lost(env, result)
    wait_healthy(env)


def rabbitmqctl(cluster: Cluster, peer: str, *argv: str) -> str:
    facts, layout = cluster.facts, cluster.host.layout(peer)
    rc, out = cluster.host.run(peer, [str(rabbitmq.CTL), "-n", facts.rabbit_node_name(peer), *argv],
                               rabbitmq.env(facts, facts.node(peer), layout), timeout=60,
                               user=layout.user(rabbitmq.NAME), cwd=Path("/"))
    assert rc == 0, out
    return out


def delete_control_queue(cluster: Cluster, peer: str, worker: str) -> None:
    """What a broker node's death can leave behind: the queue's record goes, its consumer is
    never told."""
    expr = (f'rabbit_amqqueue:internal_delete(rabbit_misc:r(<<"{rabbitmq.VHOST}">>, queue, '
            f'<<"{worker}.celery.pidbox">>), <<"haflow-test">>).')
    assert rabbitmqctl(cluster, peer, "eval", expr).strip().splitlines()[-1] == "ok"


def wait_answers(cluster: Cluster, worker: str, timeout: float, why: str) -> None:
    deadline = time.time() + timeout
    while worker not in airflow.ping_workers(cluster.facts, cluster.secrets):
        assert time.time() < deadline, f"{worker} never answered again after {why}"
        time.sleep(1)


def test_a_worker_whose_control_queue_vanished_declares_it_again_and_answers(env):
    """The worker reconnected and declared its pidbox queue while the surviving nodes were still
    cleaning up a dead node's transient queues, and the clean-up removed it: the worker must
    notice and answer pings again."""
    cluster: Cluster = env["cluster"]
    worker = airflow.worker_name(cluster.facts, "node2")
    delete_control_queue(cluster, "node1", worker)
    wait_answers(cluster, worker, 60, "its control queue vanished")


def test_a_worker_keeps_declaring_its_control_queue_until_the_broker_takes_it(env):
    """The first declarations after the queue vanished are refused (as while a stopped broker
    node's old record lingers): a failed attempt leaves no consumer, and the worker must try
    again rather than stay deaf for good (a CI run's lab worker never answered again)."""
    cluster: Cluster = env["cluster"]
    worker = airflow.worker_name(cluster.facts, "node2")
    user = cluster.secrets["rabbitmq_airflow"].username
    rabbitmqctl(cluster, "node1", "set_permissions", "-p", rabbitmq.VHOST, user, "^$", ".*", ".*")  # no declaring
    try:
        delete_control_queue(cluster, "node1", worker)
        time.sleep(3 * 5)  # the worker's check (every 5 s) finds the queue gone and is refused
        queues = rabbitmqctl(cluster, "node1", "list_queues", "-p", rabbitmq.VHOST, "name", "--silent").split()
        assert f"{worker}.celery.pidbox" not in queues, queues  # the fault took effect
    finally:
        rabbitmqctl(cluster, "node1", "set_permissions", "-p", rabbitmq.VHOST, user, ".*", ".*", ".*")
    log = (cluster.host.layout("node2").logs / f"{airflow.WORKER}.log").read_text(errors="replace")
    wait_answers(cluster, worker, 60, f"its declarations were refused for 15 s\n{log[-2000:]}")
    assert "declaring the control queue of" in log and "failed" in log, log[-2000:]  # it was refused, then retried


def test_up_restarts_a_worker_that_runs_but_answers_no_ping(env):
    """A worker deaf in a way its own check cannot see (its control queue is there, but no
    longer bound to the broadcast exchange): `up` finds it silent behind its gate, restarts it
    once (warm), and ends healthy instead of timing out."""
    cluster: Cluster = env["cluster"]
    worker = airflow.worker_name(cluster.facts, "node2")
    admin = cluster.secrets["rabbitmq_admin"]
    url = (f"{cluster.facts.nodes[0].rabbitmq_management_url}/api/bindings/{rabbitmq.VHOST}/e/celery.pidbox/q/"
           f"{worker}.celery.pidbox/~")
    r = httpx.delete(url, auth=(admin.username, admin.password), timeout=10)
    assert r.status_code == 204, (r.status_code, r.text)
    time.sleep(15)  # three of its own checks: the queue exists, so they change nothing
    assert worker not in airflow.ping_workers(cluster.facts, cluster.secrets)  # the fault took effect
    result = json.loads(haflow(env, "up", "--no-smoke", "--json").stdout)["up"]
    assert "node2: restarted airflow-worker (it answered no ping for 60 s)" in result["changed"], result["changed"]
    assert worker in airflow.ping_workers(cluster.facts, cluster.secrets)


def test_dag_processor_moves_when_its_node_dies_and_parses_new_dags(env):
    cluster: Cluster = env["cluster"]
    holder = airflow.dag_processor_holder(cluster.facts)
    assert holder
    cluster.host.kill_node(holder)
    deadline = time.time() + 180
    new = None
    while time.time() < deadline:
        new = airflow.dag_processor_holder(cluster.facts)
        if new and new != holder:
            break
        time.sleep(1)
    assert new and new != holder, "no other node took the dag-processor over"
    (env["dags"] / "haflow_added_later.py").write_text(
        "import pendulum\nfrom airflow.sdk import dag, task\n\n"
        "@dag(dag_id='haflow_added_later', schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz='UTC'))\n"
        "def added():\n    @task\n    def t():\n        return 1\n    t()\n\nadded()\n")
    haflow(env, "dags", "push")
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            if airflow_api.connect(cluster.facts, cluster.secrets).get("/dags/haflow_added_later").status_code == 200:
                break
        except Exception:
            pass  # the database may be failing over if the dead node held the primary
        time.sleep(2)
    else:
        raise AssertionError("the DAG added after the takeover was never parsed")
    haflow(env, "up", "--no-smoke")
    wait_healthy(env)


def test_down_stops_everything(env):
    cluster: Cluster = env["cluster"]
    procs = [r for n in ["_host", *cluster.facts.node_names] for r in cluster.host.processes(n)]
    haflow(env, "down")
    time.sleep(0.5)
    assert [r for r in procs if r.alive()] == []
