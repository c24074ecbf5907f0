"""The lab tier's deploy: the full cluster on 3 Debian 13 hosts over SSH, as systemd services.

lab up -> deploy -> healthy, the example DAG's tasks on every host's worker -> systemd runs each
service as an operator expects -> a second deploy changes nothing -> a PostgreSQL parameter that
needs a restart rolls node by node while a writer keeps its acknowledged writes -> down leaves
no unit running -> down --purge removes the cluster's files -> lab down leaves nothing.
The tests run in order on one lab (module scope); each later test needs the earlier ones."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from haflow.drills.writer import Writer, lost_writes
from haflow.lab import Lab, net
from haflow.secrets import Secrets

pytestmark = pytest.mark.lab
HAFLOW = [sys.executable, "-m", "haflow.cli"]
SERVICES = ("etcd", "patroni", "haproxy", "pgbouncer", "epmd", "rabbitmq", "airflow-api-server", "airflow-scheduler",
            "airflow-dag-processor", "airflow-triggerer", "airflow-worker")


def haflow(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([*HAFLOW, *args], capture_output=True, text=True, timeout=timeout)


def on(host: str, command: str) -> str:
    import asyncio
    return asyncio.run(Lab().run_on(host, command))


def journal_tails(hosts: list[str], unit: str, lines: int = 30, grep: str | None = None) -> str:
    """The last lines of a unit's journal on each host (only those matching `grep`, an extended
    regular expression, if given), for a failure's message (the lab and its journals are gone
    once the module ends)."""
    command = f"journalctl -u '{unit}' -n {lines} --no-pager -o short-iso"
    if grep:
        command = (f"journalctl -u '{unit}' -n 3000 --no-pager -o short-iso | grep -iE {shlex.quote(grep)} "
                   f"| tail -n {lines}; true")
    out = []
    for host in hosts:
        try:
            out.append(f"--- {host} {unit}\n" + on(host, command))
        except Exception as e:  # a diagnostic must not hide the failure it explains
            out.append(f"--- {host} {unit}: {e!r}")
    return "\n".join(out)


@pytest.fixture(scope="module")
def lab():
    r = haflow("lab", "up", "--balancer", "--spares", "2", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout)
    yield {**info, "spec_path": Path(info["spec"]), "names": [h["name"] for h in info["hosts"] if h["role"] == "node"],
           "balancer": next(h for h in info["hosts"] if h["role"] == "balancer"),
           "spares": [h for h in info["hosts"] if h["role"] == "spare"]}
    if os.environ.get("HAFLOW_KEEP_LAB"):  # debugging a failure: the lab stays up to be read
        return
    haflow("down", "-f", info["spec"])
    r = haflow("lab", "down")
    assert r.returncode == 0, r.stderr[-2000:]


def deploy(lab, *extra: str) -> dict:
    r = haflow("deploy", "-f", str(lab["spec_path"]), "--json", *extra)
    assert r.returncode == 0, (r.stderr[-4000:], r.stdout[-2000:])
    return json.loads(r.stdout)


def test_preflight_names_every_server_problem_at_once_and_changes_nothing(lab, tmp_path):
    data = yaml.safe_load(lab["spec_path"].read_text())
    data["nodes"][1]["ssh"]["port"] = 2222  # nobody listens there
    data["nodes"][2]["ssh"]["host"] = data["nodes"][2]["address"]
    data["nodes"][2]["address"] = "10.213.0.99"  # not the server's address
    spec = tmp_path / "broken.yaml"
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    r = haflow("deploy", "-f", str(spec), "--dry-run")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "lab2: cannot connect to root@10.213.0.12:2222" in r.stderr, r.stderr
    assert "lab3: address 10.213.0.99 is not on the server" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert on("lab1", "ls /etc/haflow 2>/dev/null | wc -l").strip() == "0"  # nothing was written


def test_deploy_brings_the_full_cluster_up_with_tasks_on_every_host(lab):
    result = deploy(lab)
    assert result["status"]["healthy"], result["status"]
    example = result["deploy"]["example_dag"]
    assert example["state"] == "success"
    assert sorted(example["nodes"]) == sorted(lab["names"])  # a task ran on every host's worker
    for name in lab["names"]:
        assert set(result["deploy"]["hosts"][name]["started"]) >= {"etcd", "patroni", "haproxy", "rabbitmq", "airflow-worker"}


def test_services_are_systemd_units_an_operator_can_read(lab):
    out = on("lab1", "systemctl is-active " + " ".join(f"haflow-lab-{s}" for s in SERVICES))
    assert out.split() == ["active"] * len(SERVICES), out
    assert on("lab1", "systemctl show -p Restart --value haflow-lab-patroni").strip() == "on-failure"
    assert on("lab1", "systemctl is-enabled haflow-lab.target").strip() == "enabled"
    journal = on("lab1", "journalctl -u haflow-lab-patroni --no-pager -o cat")
    assert "Started haflow-lab-patroni.service" in journal and "no action. I am (lab1)" in journal
    # secrets stay 0600: env files (root), configs (the service's own user)
    assert on("lab1", "stat -c '%a %U' /etc/haflow/lab/env/airflow-scheduler.env").split() == ["600", "root"]
    assert on("lab1", "stat -c '%a %U' /var/lib/haflow/lab/pg/patroni.yml").split() == ["600", "postgres"]
    assert on("lab1", "stat -c %U /proc/$(systemctl show -p MainPID --value haflow-lab-etcd)").strip() == "etcd"
    # PostgreSQL is the release's own (Debian 13: 17), found on the host, not assumed
    postmaster = "$(head -1 /var/lib/haflow/lab/pg/data/postmaster.pid)"
    assert on("lab1", f"readlink /proc/{postmaster}/exe").strip() == "/usr/lib/postgresql/17/bin/postgres"


def test_a_killed_service_is_restarted_by_systemd_with_a_new_instance(lab):
    from haflow.cli import make_cluster

    cluster = make_cluster(lab["spec_path"], None)
    try:
        killed = cluster.host.kill_service("lab2", "haproxy")
        assert len(killed) == 1
        deadline = time.monotonic() + 30
        now = None
        while time.monotonic() < deadline:
            now = cluster.host.instance("lab2", "haproxy")
            if now and now.id != killed[0].id:
                break
            time.sleep(0.5)
        assert now is not None and now.id != killed[0].id
    finally:
        cluster.host.close()
    # and the cluster as a whole recovers from the crash (the node's Airflow processes lost their
    # database connections through that HAProxy) before the next test reads it
    deadline = time.monotonic() + 180
    while haflow("status", "-f", str(lab["spec_path"])).returncode != 0:
        assert time.monotonic() < deadline, "the cluster did not recover from a killed HAProxy within 180 s"
        time.sleep(3)


def test_a_second_deploy_changes_nothing_and_a_dry_run_sees_nothing(lab):
    result = deploy(lab, "--no-smoke")
    assert result["deploy"]["changed"] == [], result["deploy"]["changed"]
    for name in lab["names"]:
        assert result["deploy"]["hosts"][name] == {"files_changed": [], "started": [], "restarted": [], "reloaded": []}
    r = haflow("deploy", "-f", str(lab["spec_path"]), "--dry-run", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    plan = json.loads(r.stdout)["hosts"]
    assert all(p == {"files": [], "start": [], "restart": []} for p in plan.values()), plan


def test_the_other_commands_work_on_the_deployed_cluster(lab):
    spec = str(lab["spec_path"])
    r = haflow("dags", "push", "-f", spec)
    assert r.returncode == 0, r.stderr[-2000:]
    r = haflow("dags", "trigger", "haflow_example", "--json", "-f", spec)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["state"] == "success"
    r = haflow("switchover", "--json", "-f", spec)
    assert r.returncode == 0, r.stderr[-2000:]
    moved = json.loads(r.stdout)
    assert moved["from"] != moved["to"]
    # the database layer is whole again once the old primary streams from the new one; Airflow's
    # own recovery after a switchover on these hosts is measured by the drills (issue 11)
    deadline = time.monotonic() + 120
    while True:
        r = haflow("status", "--json", "-f", spec)
        snap = json.loads(r.stdout)
        db = snap["layers"]["database"]
        if db["healthy"] or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert db["healthy"] and db["leader"] == moved["to"], db
    assert all(n["supervisor"] for n in snap["nodes"])  # systemd runs the node's units
    r = haflow("secrets", "show", "-f", spec)
    assert r.returncode == 0 and "airflow_admin" in r.stdout


def test_a_restart_parameter_rolls_node_by_node_while_writes_continue(lab, tmp_path):
    spec = lab["spec_path"]
    data = yaml.safe_load(spec.read_text())
    data["database"]["parameters"]["max_connections"] = 210
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    secrets = Secrets.load(spec.parent / ".haflow", set(), True)
    su = secrets["postgres_superuser"]
    addresses = [h["address"] for h in lab["hosts"] if h["role"] == "node"]
    for a in addresses:
        net.check_route(a)
    port = data["ports"]["pg_primary"]
    writer = Writer([f"{a}:{port}" for a in addresses], su.username, su.password, "postgres", run_id=7)
    writer.ensure_table()
    writer.start()
    try:
        result = deploy(lab, "--no-smoke")
    finally:
        log = writer.stop()
    changed = result["deploy"]["changed"]
    restarted = [c for c in changed if "restarted PostgreSQL" in c]
    assert len(restarted) == 3, changed
    switched = next(i for i, c in enumerate(changed) if c.startswith("switched the primary"))
    assert changed.index(restarted[-1]) > switched  # the primary's node last, after a switchover
    assert len(log.acknowledged) > 0
    assert lost_writes(log, f"{addresses[0]}:{port}", su.username, su.password, "postgres") == []
    for h in (h for h in lab["hosts"] if h["role"] == "node"):  # asked on each host itself: PostgreSQL admits the nodes' addresses only
        out = on(h["name"], f"PGPASSWORD={shlex.quote(su.password)} psql -h {h['address']} -p {data['ports']['postgres']} "
                            f"-U {su.username} -d postgres -Atc 'SHOW max_connections'")
        assert out.strip() == "210", (h["name"], out)


def drill(lab, *args: str) -> dict:
    r = haflow("drill", *args, "--json", "-f", str(lab["spec_path"]))
    assert r.stdout.strip(), r.stderr[-4000:]
    result = json.loads(r.stdout)
    why = (result["violations"], result["timeline"], r.stderr[-3000:])
    assert r.returncode == 0 and result["ok"], why
    assert result["fault_took_effect"] and result["acknowledged_writes_lost"] == 0, why
    assert result["canary_runs_found"] == result["canary_triggers_acknowledged"] > 0, why
    return result


def test_node_crash_powers_the_primarys_server_off_and_it_rejoins_by_itself(lab):
    """A real power-off (the host's init SIGKILLed, through nodes[].control): the majority takes
    over, and the server, booted again, brings its node back with its own systemd, no deploy."""
    result = drill(lab, "node-crash", "--hold", "15")
    events = [e["event"] for e in result["timeline"]]
    assert any("powered off hard" in e for e in events) and any("booted" in e for e in events), events
    assert not any("haflow up" in e for e in events), events
    assert result["recovered_s"] is not None


def test_node_partition_the_isolated_primary_acknowledges_no_write_and_rejoins(lab):
    """The primary's server cut off from everyone (this machine too): the majority elects a
    primary, the old one refuses writes made on its own server, and after the heal it rejoins."""
    result = drill(lab, "node-partition", "--hold", "10")
    assert result["split_brain"] is False and result["isolated_primary_writes_acknowledged"] == 0, result["timeline"]
    assert result["isolated_writes_attempted"] > 0 and result["isolated_primary_refuses_writes_s"] is not None
    assert result["majority_primary"] not in (None, result["node"])
    # the old primary's server rejoined: every layer healthy, its PostgreSQL a streaming replica
    snap = json.loads(haflow("status", "--json", "-f", str(lab["spec_path"])).stdout)
    member = next(m for m in snap["layers"]["database"]["members"] if m["node"] == result["node"])
    assert member["role"] in ("replica", "sync_standby") and member["state"] == "streaming", snap


def test_broker_partition_pauses_the_cut_rabbitmq_and_the_queue_leader_moves(lab):
    """Only RabbitMQ's links cut (epmd and distribution ports) around the node leading the task
    queue: with pause_minority it pauses, the majority takes the queue over, no task is lost,
    and after the heal it rejoins."""
    result = drill(lab, "broker-partition", "--hold", "10")
    assert result["broker_paused_s"] is not None, result["timeline"]
    assert result["new_queue_leader"] not in (None, result["node"]), result["timeline"]
    snap = json.loads(haflow("status", "--json", "-f", str(lab["spec_path"])).stdout)
    assert all(m["running"] and not m["partitions"] for m in snap["layers"]["broker"]["members"]), snap["layers"]["broker"]


def test_lb_check_follows_a_switchover_through_the_stand_in_cloud_balancer(lab):
    """A balancer haflow does not run (HAProxy on its own lab host, configured only from
    `haflow lb settings`, as a cloud LB would be): it reaches the primary and the Airflow API,
    and follows a planned switchover."""
    address = lab["balancer"]["address"]
    r = haflow("lb", "check", f"{address}:5432", "--api", f"http://{address}:8080", "--switchover", "--json",
               "-f", str(lab["spec_path"]))
    result = json.loads(r.stdout) if r.stdout.strip() else {"stderr": r.stderr[-3000:]}
    assert r.returncode == 0 and result["ok"], result
    assert result["reaches_primary"] and result["api_ok"] and result["old_connections_closed"] is True, result
    assert result["follow_s"] is not None, result
    # its read-only port reaches a replica, which `lb check` rightly calls wrong for writes; right
    # after the switchover it may still reach the new primary (a replica until then) for up to
    # its checks' 2 x 5 s to fall: ask again until then
    deadline = time.monotonic() + 45
    while True:
        r = haflow("lb", "check", f"{address}:5433", "--json", "-f", str(lab["spec_path"]))
        if r.returncode == 1 or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert r.returncode == 1 and not json.loads(r.stdout)["reaches_primary"], r.stdout


def deploy_with_spares(lab, file_name: str, spares: list[dict], etcd_members: bool = False,
                       **node: object) -> tuple[Path, dict]:
    """Deploy the lab's spec plus these spare hosts (with the given node fields, e.g. roles;
    `etcd_members`: they join etcd too), written next to the lab's spec (the same state
    directory); the deploy's JSON, healthy."""
    data = yaml.safe_load(lab["spec_path"].read_text())
    for spare in spares:
        data["nodes"].append({"name": spare["name"], "address": spare["address"], **node,
                              "ssh": dict(data["nodes"][0]["ssh"])})
        if etcd_members:
            data["etcd"]["members"].append(spare["name"])
    grown = lab["spec_path"].parent / file_name
    grown.write_text(yaml.safe_dump(data, sort_keys=False))
    r = haflow("deploy", "-f", str(grown), "--json")
    assert r.returncode == 0, (r.stderr[-4000:], r.stdout[-2000:])
    result = json.loads(r.stdout)
    assert result["status"]["healthy"], result["status"]
    return grown, result


def fanout_reaches(spec: Path, node: str) -> None:
    """The fanout DAG succeeds and `node`'s worker ran some of its tasks (20 tasks over 4
    workers: asked again if not, at most twice)."""
    ran_on: list[str] = []
    for _ in range(3):
        r = haflow("dags", "trigger", "haflow_fanout", "--json", "-f", str(spec))
        run = json.loads(r.stdout)
        assert r.returncode == 0 and run["state"] == "success", (run, r.stderr[-2000:])
        ran_on = run["nodes"]
        if node in ran_on:
            return
    assert node in ran_on, ran_on


def test_a_worker_only_node_is_added_by_deploy_and_removed_cleanly(lab):
    """The spec gains a worker-only server: deploy adds it without restarting the others and its
    worker runs tasks; deleted from the spec, `node remove` drains it, deletes its files, and the
    cluster stays healthy and runs DAGs."""
    spare = lab["spares"][0]
    grown, result = deploy_with_spares(lab, "cluster-grown.yaml", [spare], roles=["worker"])
    assert set(result["deploy"]["hosts"][spare["name"]]["started"]) == {"haproxy", "pgbouncer", "airflow-worker"}, result["deploy"]
    for name in lab["names"]:  # the full nodes: PostgreSQL admits the new address (a reload), nothing restarts
        assert result["deploy"]["hosts"][name]["restarted"] == [], result["deploy"]["hosts"]
    units = on(spare["name"], "systemctl list-units --plain --no-legend 'haflow-lab-*.service' | awk '{print $1}'").split()
    assert sorted(units) == ["haflow-lab-airflow-worker.service", "haflow-lab-haproxy.service",
                             "haflow-lab-pgbouncer.service"], units
    fanout_reaches(grown, spare["name"])

    # still in the spec: refused, nothing touched
    r = haflow("node", "remove", spare["name"], "--yes", "-f", str(grown))
    assert r.returncode == 2 and "delete it from `nodes:` first" in r.stderr, r.stderr
    r = haflow("node", "remove", "lab1", "--yes", "-f", str(lab["spec_path"]))
    assert r.returncode == 2 and "still in" in r.stderr, r.stderr
    # a DAG running while the node is removed still succeeds (its worker is drained warm; what
    # it had not started goes to the other workers)
    running = subprocess.Popen([*HAFLOW, "dags", "trigger", "haflow_fanout", "--json", "-f", str(lab["spec_path"])],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(8)  # its tasks are being scheduled and run
    r = haflow("node", "remove", spare["name"], "--yes", "--json", "-f", str(lab["spec_path"]))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["removed"] == spare["name"]
    out, err = running.communicate(timeout=900)
    assert running.returncode == 0 and json.loads(out)["state"] == "success", (out, err[-2000:])
    assert on(spare["name"], "ls /etc/haflow /var/lib/haflow /etc/systemd/system 2>/dev/null | grep -c lab; true").strip() == "0"
    assert on("lab1", f"grep -c {spare['address']} /var/lib/haflow/lab/pg/patroni.yml; true").strip() == "0"
    snap = json.loads(haflow("status", "--json", "-f", str(lab["spec_path"])).stdout)
    assert snap["healthy"] and snap["removed_nodes"] == [], snap
    assert sorted(snap["layers"]["airflow"]["workers"]) == sorted(f"{n}@lab" for n in lab["names"]), snap
    r = haflow("dags", "trigger", "haflow_example", "--json", "-f", str(lab["spec_path"]))
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "success", r.stderr[-2000:]
    grown.unlink()


def test_two_full_nodes_join_etcd_and_all_by_deploy_and_leave_by_node_remove(lab):
    """Three servers become five: deploy adds each new etcd member (a learner, then promoted),
    builds a Patroni replica on each, joins their RabbitMQ nodes and grows every quorum queue
    onto them, starts their Airflow services (the running nodes' dag-processors restart for the
    new etcd list, behind the gate). The new nodes run tasks. Deleted from the spec, `node
    remove` takes them out one at a time, one of them after its server died (`--server-gone`),
    and the cluster is healthy on three nodes again."""
    spares, names = lab["spares"], lab["names"]
    new = [s["name"] for s in spares]
    five, result = deploy_with_spares(lab, "cluster-five.yaml", spares, etcd_members=True)
    for name in new:
        started = set(result["deploy"]["hosts"][name]["started"])
        assert {"etcd", "patroni", "rabbitmq", "airflow-scheduler", "airflow-worker"} <= started, started
    for name in names:  # the dag-processor elector's etcd list changed: a rolling restart
        assert "airflow-dag-processor" in result["deploy"]["hosts"][name]["restarted"], result["deploy"]["hosts"]
    layers = json.loads(haflow("status", "--json", "-f", str(five)).stdout)["layers"]
    assert sorted(m["node"] for m in layers["dcs"]["members"]) == sorted([*names, *new]), layers["dcs"]
    assert layers["dcs"]["healthy"], layers["dcs"]
    db = {m["node"]: m for m in layers["database"]["members"]}
    assert all(db[n]["state"] == "streaming" for n in new), db
    assert {m["node"] for m in layers["broker"]["members"] if m["running"]} == {*names, *new}, layers["broker"]
    queues = layers["broker"]["quorum_queues"]
    assert queues and all(q["members"] == q["online"] == 5 for q in queues), queues
    assert {f"{n}@lab" for n in new} <= set(layers["airflow"]["workers"]), layers["airflow"]
    fanout_reaches(five, new[0])
    again = json.loads(haflow("deploy", "-f", str(five), "--json", "--no-smoke").stdout)
    assert again["deploy"]["changed"] == [], again["deploy"]["changed"]  # idempotent

    # the second new server dies for good: the survivors drop it, nothing is asked of it; the
    # first leaves the normal way (roles handed over, stopped, its files deleted)
    r = haflow("node", "remove", new[1], "--yes", "--server-gone", "-f", str(lab["spec_path"]))
    assert r.returncode == 2 and "answers" in r.stderr, r.stderr  # refused while it runs
    Lab().poweroff(new[1])
    r = haflow("node", "remove", new[1], "--yes", "--server-gone", "--json", "-f", str(lab["spec_path"]))
    # (a CI run timed out here once, waiting for a dag-processor after the rolling restart)
    assert r.returncode == 0 and json.loads(r.stdout)["server_touched"] is False, \
        r.stderr[-3000:] + "\n" + journal_tails([*names, new[0]], "haflow-lab-airflow-dag-processor") + "\n" \
        + journal_tails([*names, new[0]], "haflow-lab-airflow-worker", 25, "pidbox|control queue|connect|warning|error")
    r = haflow("node", "remove", new[0], "--yes", "--json", "-f", str(lab["spec_path"]))
    assert r.returncode == 0, r.stderr[-3000:]
    snap = json.loads(haflow("status", "--json", "-f", str(lab["spec_path"])).stdout)
    assert snap["healthy"] and snap["removed_nodes"] == [], snap
    assert sorted(m["node"] for m in snap["layers"]["dcs"]["members"]) == sorted(names), snap["layers"]["dcs"]
    queues = snap["layers"]["broker"]["quorum_queues"]
    assert queues and all(q["members"] == q["online"] == 3 for q in queues), queues  # their replicas dropped
    assert on(new[0], "ls /etc/haflow /var/lib/haflow /etc/systemd/system 2>/dev/null | grep -c lab; true").strip() == "0"
    r = haflow("dags", "trigger", "haflow_example", "--json", "-f", str(lab["spec_path"]))
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "success", r.stderr[-2000:]
    five.unlink()


def test_down_stops_every_unit_and_purge_removes_the_cluster(lab):
    r = haflow("down", "-f", str(lab["spec_path"]))
    assert r.returncode == 0, r.stderr[-2000:]
    for name in lab["names"]:
        states = on(name, "systemctl is-active " + " ".join(f"haflow-lab-{s}" for s in SERVICES) + "; true").split()
        assert set(states) == {"inactive"}, (name, states)
        assert on(name, "systemctl is-enabled haflow-lab.target; true").strip() == "disabled"
    r = haflow("down", "-f", str(lab["spec_path"]), "--purge", "--yes")
    assert r.returncode == 0, r.stderr[-2000:]
    for name in lab["names"]:
        assert on(name, "ls /etc/haflow /var/lib/haflow /etc/systemd/system | grep -c lab; true").strip() == "0"
    assert not (lab["spec_path"].parent / ".haflow").exists()
