"""The HA database layer for real: etcd x3 + Patroni/PostgreSQL x3 + HAProxy x3 on this machine.

One cluster for the whole module, driven through the real `haflow` CLI. The tests run in file
order: bring-up, routing, idempotence, losing the leader's node under write load, rejoin, down.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import psycopg
import pytest
import yaml

from haflow.cluster import Cluster
from haflow.components import etcd, haproxy, patroni
from haflow.drills.writer import LongTransactions, PooledWriter, Writer, lost_writes
from haflow.spec import default_spec_text, load_spec

pytestmark = pytest.mark.integration

ADDRESSES = ["127.0.0.31", "127.0.0.32", "127.0.0.33"]  # away from a developer's default cluster
HAFLOW = [sys.executable, "-m", "haflow.cli"]


def haflow(env, *args, check=True, timeout=600):
    r = subprocess.run([*HAFLOW, *args, "-f", str(env["spec"])], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"haflow {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


def status(env) -> dict:
    return json.loads(haflow(env, "status", "--json", check=False).stdout)


@pytest.fixture(scope="module")
def env():
    # /var/tmp, world-traversable: PostgreSQL runs as `postgres` and must reach its data dir.
    root = Path(tempfile.mkdtemp(prefix="haflow-it-", dir="/var/tmp"))
    root.chmod(0o755)
    data = yaml.safe_load(default_spec_text())
    data["cluster"] = "itest"
    data["ports"]["epmd"] = 4370  # its own epmd: a developer's cluster may hold 4369
    for node, addr in zip(data["nodes"], ADDRESSES):
        node["address"] = addr
    spec_path = root / "cluster.yaml"
    spec_path.write_text(yaml.safe_dump(data))
    cluster = Cluster(load_spec(spec_path), root / ".haflow")
    e = {"spec": spec_path, "cluster": cluster, "root": root}
    yield e
    # Teardown: orderly down; whatever survives is killed by its verified PID, never by name.
    subprocess.run([*HAFLOW, "down", "-f", str(spec_path)], capture_output=True, timeout=300)
    cluster.kill_all()
    shutil.rmtree(root, ignore_errors=True)
    cluster.host.purge()  # the state dir and what lives outside it (DB, service folders, sockets)


def superuser(env):
    return env["cluster"].secrets["postgres_superuser"]


def query(endpoint: str, account, sql: str, dbname="postgres"):
    host, port = endpoint.rsplit(":", 1)
    with psycopg.connect(host=host, port=int(port), user=account.username, password=account.password,
                         dbname=dbname, connect_timeout=3, autocommit=True) as conn:
        cur = conn.execute(sql)
        return cur.fetchall() if cur.description else []


def test_up_brings_a_healthy_layer(env):
    r = haflow(env, "up")
    assert "is up" in r.stdout
    snap = status(env)
    assert snap["healthy"] is True, snap
    db = snap["layers"]["database"]
    roles = sorted(m["role"] for m in db["members"])
    assert roles == ["leader", "replica", "sync_standby"]
    assert [m["state"] for m in db["members"] if m["role"] != "leader"] == ["streaming", "streaming"]
    assert snap["layers"]["dcs"]["leader"] in env["cluster"].facts.node_names
    assert all(m["healthy"] for m in snap["layers"]["dcs"]["members"])
    assert snap["layers"]["balancer"]["endpoints"]["postgres_primary"] == [f"{a}:5000" for a in ADDRESSES]


def test_secrets_file_is_0600_and_json_has_accounts(env):
    path = env["root"] / ".haflow" / "secrets.yaml"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    shown = json.loads(haflow(env, "secrets", "show", "--json").stdout)
    assert shown["postgres_airflow"]["username"] == "airflow" and shown["postgres_airflow"]["password"]
    conf = env["cluster"].host.layout("node1").db_root / "patroni.yml"
    assert oct(conf.stat().st_mode & 0o777) == "0o600"
    assert shown["postgres_superuser"]["password"] not in haflow(env, "status").stdout


def test_writes_through_every_balancer_reach_the_leader(env):
    facts = env["cluster"].facts
    leader = status(env)["layers"]["database"]["leader"]
    leader_addr = facts.node(leader).address
    su = superuser(env)
    query(facts.nodes[0].pg_primary, su, "CREATE TABLE IF NOT EXISTS routing_check (node text, served_by inet)")
    for n in facts.nodes:
        rows = query(n.pg_primary, su, f"INSERT INTO routing_check VALUES ('{n.name}', inet_server_addr()) "
                                       "RETURNING host(served_by), pg_is_in_recovery()")
        assert rows == [(leader_addr, False)], n.name
    # and the replica ports reach replicas
    for n in facts.nodes:
        ((in_recovery,),) = query(n.pg_replicas, su, "SELECT pg_is_in_recovery()")
        assert in_recovery is True


def test_airflow_role_and_database_exist(env):
    facts = env["cluster"].facts
    airflow = env["cluster"].secrets["postgres_airflow"]
    ((user, db),) = query(facts.nodes[1].pg_primary, airflow, "SELECT current_user, current_database()", dbname="airflow")
    assert (user, db) == ("airflow", "airflow")


def test_second_up_changes_nothing(env):
    r = haflow(env, "up", "--json")
    assert json.loads(r.stdout)["up"]["changed"] == []


def wait_database_healthy(env, timeout_s: float = 180) -> dict:
    """The database layer whole again: a leader and a streaming synchronous standby. In
    synchronous mode Patroni promotes only the standby named in etcd's /sync key, so a leader
    lost before a new standby is named (seconds after a switchover, longer on a loaded machine)
    is not replaced at all: a test that kills one must wait for this first."""
    deadline = time.time() + timeout_s
    while True:
        db = status(env)["layers"]["database"]
        if db["healthy"] or time.time() > deadline:
            assert db["healthy"], db
            return db
        time.sleep(1)


def diagnose(env, nodes) -> str:
    """What a failed failover test needs to be understood from a CI log: each survivor's last
    Patroni lines, the etcd members' health and Patroni's view of the cluster."""
    cluster: Cluster = env["cluster"]
    parts = [f"patroni /cluster: {patroni.cluster_view(cluster.facts)}"]
    for node in nodes:
        parts.append(f"etcd member {node.name} healthy: {etcd.member_health(node)}")
        log = cluster.host.layout(node.name).logs / "patroni.log"
        lines = log.read_text(errors="replace").splitlines()[-25:] if log.exists() else ["(no log)"]
        parts.append(f"--- {node.name} patroni.log tail ---\n" + "\n".join(lines))
    return "\n".join(parts)


def pids(cluster: Cluster) -> set[tuple[int, float]]:
    return {(r.pid, r.create_time) for n in cluster.facts.node_names for r in cluster.host.processes(n)}


def test_a_second_spec_on_the_same_state_directory_leaves_the_cluster_untouched(env):
    staging = yaml.safe_load(env["spec"].read_text())
    staging["cluster"] = "staging"
    path = env["root"] / "staging.yaml"  # side by side: the same .haflow
    path.write_text(yaml.safe_dump(staging))
    before = pids(env["cluster"])
    configs = {p: p.read_bytes() for p in (env["root"] / ".haflow" / "nodes").rglob("*.cfg")}
    for cmd in (["up"], ["down"], ["down", "--purge", "--yes"], ["switchover"]):
        r = subprocess.run([*HAFLOW, *cmd, "-f", str(path)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "'itest'" in r.stderr and "'staging'" in r.stderr, (cmd, r.stderr)
    assert pids(env["cluster"]) == before
    assert {p: p.read_bytes() for p in configs} == configs
    assert status(env)["healthy"] is True


@pytest.mark.parametrize("damage", ["delete", "empty", "truncate"])
def test_lost_secrets_exit_2_and_the_cluster_keeps_its_passwords(env, damage):
    path = env["root"] / ".haflow" / "secrets.yaml"
    saved = path.read_bytes()
    try:
        if damage == "delete":
            path.unlink()
        else:
            path.write_bytes(b"" if damage == "empty" else saved[: len(saved) // 2])
        damaged = path.read_bytes() if path.exists() else None
        for cmd in (["up"], ["status"], ["secrets", "show"]):
            r = haflow(env, *cmd, check=False)
            assert r.returncode == 2 and "restore" in r.stderr and "--regenerate-secrets" in r.stderr, (cmd, r.stderr)
        assert (path.read_bytes() if path.exists() else None) == damaged  # never rewritten
    finally:
        path.write_bytes(saved)
        path.chmod(0o600)
    su = SimpleNamespace(**yaml.safe_load(saved)["postgres_superuser"])
    ((one,),) = query(env["cluster"].facts.nodes[0].pg_primary, su, "SELECT 1")
    assert one == 1 and status(env)["healthy"] is True


def test_the_stats_page_asks_for_a_password(env):
    import httpx

    url = env["cluster"].facts.nodes[0].haproxy_stats_url
    assert httpx.get(url, timeout=3).status_code == 401
    stats = env["cluster"].secrets["haproxy_stats"]
    assert httpx.get(url, auth=(stats.username, stats.password), timeout=3).status_code == 200


def test_a_parameter_that_needs_a_restart_rolls_node_by_node_under_writes(env):
    cluster: Cluster = env["cluster"]
    facts = cluster.facts
    etcd_before = {(r.pid, r.create_time) for n in facts.node_names for r in cluster.host.processes(n) if "etcd" in " ".join(r.process().cmdline())}
    data = yaml.safe_load(env["spec"].read_text())
    data["database"]["parameters"]["max_connections"] = 210
    env["spec"].write_text(yaml.safe_dump(data))
    su = superuser(env)
    writer = Writer([n.pg_primary for n in facts.nodes], su.username, su.password, "postgres", run_id=5)
    writer.ensure_table()
    writer.start()
    try:
        r = haflow(env, "up", "--json", "--no-smoke")
    finally:
        log = writer.stop()
    changed = json.loads(r.stdout)["up"]["changed"]
    restarted = [c for c in changed if "restarted PostgreSQL" in c]
    assert len(restarted) == 3, changed
    assert any(c.startswith("switched the primary") for c in changed), changed
    assert changed.index(restarted[-1]) > next(i for i, c in enumerate(changed) if c.startswith("switched the primary"))
    for n in facts.nodes:
        ((value,),) = query(n.postgres, su, "SHOW max_connections")
        assert value == "210", n.name
    assert lost_writes(log, facts.nodes[0].pg_primary, su.username, su.password, "postgres") == []
    assert len(log.acknowledged) > 0
    still = {(r.pid, r.create_time) for n in facts.node_names for r in cluster.host.processes(n) if r.alive() and "etcd" in " ".join(r.process().cmdline())}
    assert etcd_before <= still  # other layers were not restarted
    assert json.loads(haflow(env, "up", "--json", "--no-smoke").stdout)["up"]["changed"] == []


def test_switchover_refuses_unsafe_targets_and_moves_the_primary_without_losing_writes(env):
    cluster: Cluster = env["cluster"]
    facts = cluster.facts
    db = status(env)["layers"]["database"]
    leader = db["leader"]
    sync = next(m["node"] for m in db["members"] if m["role"] == "sync_standby")
    other = next(m["node"] for m in db["members"] if m["role"] == "replica")
    r = haflow(env, "switchover", "--to", other, check=False)
    assert r.returncode == 2 and "not the synchronous standby" in r.stderr, r.stderr
    r = haflow(env, "switchover", "--to", "node9", check=False)
    assert r.returncode == 2 and "unknown node 'node9'" in r.stderr
    r = haflow(env, "switchover", "--to", leader, check=False)
    assert r.returncode == 2 and "already the primary" in r.stderr

    su = superuser(env)
    writer = Writer([n.pg_primary for n in facts.nodes], su.username, su.password, "postgres", run_id=2)
    writer.ensure_table()
    # a client of the poolers, as Airflow is: the switchover pauses them around the change
    account = cluster.secrets["postgres_airflow"]
    pooled = PooledWriter([facts.nodes[1].pooler], account.username, account.password, facts.airflow_db, run_id=3)
    pooled.ensure_table()
    # ... and one whose transactions take 0.3 s, like a scheduler's: one is open whenever the
    # primary stops, and without the pause it dies with it (AdminShutdown, seen once)
    slow = LongTransactions(facts.nodes[2].pooler, account.username, account.password, facts.airflow_db)
    writer.start()
    pooled.start()
    slow.start()
    time.sleep(3)
    started = time.time()
    result = json.loads(haflow(env, "switchover", "--json").stdout)
    done = time.time()
    time.sleep(3)
    log, plog, slow_errors = writer.stop(), pooled.stop(), slow.stop()
    assert (result["from"], result["to"]) == (leader, sync)
    assert result["poolers_paused"] == facts.node_names, result
    # the pooled clients saw no error: their queries waited and went on on the new primary
    assert [e for e in plog.errors if e[0] >= started] == [], plog.errors
    assert slow_errors == [] and len(slow.commits) > 10, (slow_errors, len(slow.commits))
    assert len([t for t in plog.ack_times if t > done]) > 10
    assert result["paused_s"] < result["promoted_s"] <= result["resumed_s"] <= result["routed_s"], result
    assert lost_writes(plog, facts.nodes[0].pg_primary, account.username, account.password, facts.airflow_db) == []
    # writes resumed through the balancers (the writer knows no other address) once it returned
    resumed = [t for t in log.ack_times if t > done]
    assert len(resumed) > 10, f"{len(resumed)} writes acknowledged in the 3 s after the switchover"
    assert status(env)["layers"]["database"]["leader"] == sync
    assert lost_writes(log, facts.nodes[0].pg_primary, su.username, su.password, "postgres") == []
    assert log.longest_gap() < 30  # measured, not a target: bench/ records the gap


def test_a_balancer_told_the_primary_routes_at_once_and_its_checks_correct_a_wrong_word(env):
    """What a switchover does once the candidate is promoted: tell every balancer through its
    stats page. Told a replica is the primary, a balancer routes there at once (so the word
    works), and its own health checks put the real primary back within a few checks (so a
    wrong word cannot last)."""
    cluster: Cluster = env["cluster"]
    facts, secrets = cluster.facts, cluster.secrets
    leader = wait_database_healthy(env)["leader"]
    replica = next(n.name for n in facts.nodes if n.name != leader)
    node = facts.nodes[0]
    assert haproxy.force_primary(node, secrets, replica, [leader])
    told = haproxy.up_servers(haproxy.server_states(node, secrets), haproxy.PRIMARY_PROXY)
    assert told == [replica], told
    deadline = time.monotonic() + 15
    while (now := haproxy.up_servers(haproxy.server_states(node, secrets), haproxy.PRIMARY_PROXY)) != [leader]:
        assert time.monotonic() < deadline, f"the checks did not correct the forced route: {now}"
        time.sleep(0.2)


def test_lb_check_verifies_a_real_balancer_and_measures_how_it_follows_a_switchover(env):
    """`haflow lb check` against real balancers: a node's HAProxy primary port (health check on
    Patroni's /primary, as lb settings asks) passes and follows a switchover; its replicas port
    reaches a replica, which the check must call wrong (exit 1)."""
    facts = env["cluster"].facts
    wait_database_healthy(env)
    r = haflow(env, "lb", "check", facts.nodes[0].pg_replicas, "--json", check=False)
    bad = json.loads(r.stdout)
    assert r.returncode == 1 and not bad["ok"] and not bad["reaches_primary"], bad
    assert "not the primary" in bad["problems"][0]
    r = haflow(env, "lb", "check", facts.nodes[0].pg_primary, "--switchover", "--json", check=False)
    good = json.loads(r.stdout)
    assert r.returncode == 0 and good["ok"], good
    assert good["reaches_primary"] and good["old_connections_closed"] is True
    assert good["follow_s"] is not None and good["primary"] == status(env)["layers"]["database"]["leader"]


def test_losing_the_leaders_node_loses_no_acknowledged_write_and_it_rejoins(env):
    cluster: Cluster = env["cluster"]
    facts = cluster.facts
    before = wait_database_healthy(env)  # the switchover before left no synchronous standby for a while
    old_leader = before["leader"]
    survivor = next(n for n in facts.nodes if n.name != old_leader)
    su = superuser(env)
    data_inode = cluster.host.layout(old_leader).pg_data.stat().st_ino
    patroni_log = cluster.host.layout(old_leader).logs / "patroni.log"
    basebackups_before = patroni_log.read_text().count("created using basebackup")

    writer = Writer([survivor.pg_primary], su.username, su.password, "postgres", run_id=1)
    writer.ensure_table()
    writer.start()
    time.sleep(3)
    killed_at = time.time()
    victims = {v.label for v in cluster.host.processes(old_leader)}
    # the node's supervisord and the postmaster Patroni forked (found through Service.forks) die too
    assert f"{old_leader}/supervisord" in victims and f"{old_leader}/patroni forked" in victims
    assert cluster.host.kill_node(old_leader) >= len(victims) - 2  # a backend may come or go meanwhile

    # A new leader takes over while the dead node stays dead (nothing restarts it).
    deadline = time.time() + 90
    new_leader = None
    while time.time() < deadline:
        new_leader = patroni.probe(facts).leader
        if new_leader and new_leader != old_leader and writer.log.first_ack_after(killed_at + 0.5):
            break
        time.sleep(0.5)
    survivors = [n for n in facts.nodes if n.name != old_leader]
    assert new_leader and new_leader != old_leader, f"no new leader\n{diagnose(env, survivors)}"
    # Patroni's on_role_change callback moved etcd's raft leadership off the new primary's node.
    deadline = time.time() + 15
    while time.time() < deadline and etcd.leader_name(facts) in (new_leader, None):
        time.sleep(0.5)
    assert etcd.leader_name(facts) not in (new_leader, old_leader, None)
    time.sleep(2)
    log = writer.stop()
    assert not cluster.host.running(old_leader) and cluster.host.processes(old_leader) == []

    first_after = log.first_ack_after(killed_at)
    assert first_after is not None, "writes did not resume through the surviving balancer"
    lost = lost_writes(log, survivor.pg_primary, su.username, su.password, "postgres")
    assert lost == [], f"acknowledged writes lost: {lost}"
    assert len(log.acknowledged) > 50

    # The node comes back with `haflow up` and rejoins as a streaming replica, rewound in place.
    haflow(env, "up")
    snap = status(env)
    assert snap["healthy"], snap
    member = next(m for m in snap["layers"]["database"]["members"] if m["node"] == old_leader)
    assert member["role"] in ("replica", "sync_standby") and member["state"] == "streaming"
    assert cluster.host.layout(old_leader).pg_data.stat().st_ino == data_inode  # no re-copy
    assert patroni_log.read_text().count("created using basebackup") == basebackups_before
    # every acknowledged row is on the rejoined node too
    node_pg = facts.node(old_leader).postgres
    lo, hi = min(log.acknowledged), max(log.acknowledged)
    deadline = time.time() + 30
    while time.time() < deadline:
        ((count,),) = query(node_pg, su, f"SELECT count(*) FROM haflow_canary_writes WHERE id BETWEEN {lo} AND {hi}")
        if count >= len(log.acknowledged):
            break
        time.sleep(0.5)
    assert count >= len(log.acknowledged)


def test_up_after_a_simulated_reboot_restarts_everything_and_keeps_data(env):
    """A reboot: every process gone at once (nothing stopped cleanly), /run wiped."""
    cluster: Cluster = env["cluster"]
    su = superuser(env)
    before = query(cluster.facts.nodes[0].pg_primary, su, "SELECT count(*) FROM haflow_canary_writes")[0][0]
    cluster.kill_all()
    shutil.rmtree(cluster.host.run_base)
    r = haflow(env, "up", "--json")
    assert json.loads(r.stdout)["status"]["healthy"] is True
    after = query(cluster.facts.nodes[0].pg_primary, su, "SELECT count(*) FROM haflow_canary_writes")[0][0]
    assert after == before


def test_down_leaves_no_process_behind(env):
    cluster: Cluster = env["cluster"]
    procs = [r for n in ["_host", *cluster.facts.node_names] for r in cluster.host.processes(n)]
    assert len(procs) > 20
    haflow(env, "down")
    time.sleep(0.5)
    assert [r for r in procs if r.alive()] == []
    assert all(cluster.host.processes(n) == [] for n in cluster.facts.node_names)
    listening = [c.laddr for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.ip in ADDRESSES]
    assert listening == []
    # data is kept: a second up restarts the same cluster
    assert (env["root"] / ".haflow" / "nodes" / "node1" / "pg" / "data" / "PG_VERSION").exists()
