"""`haflow drill` against a real local cluster: every scenario once, its invariants asserted
(not its timings: those are bench/bench_drills.py's). The DAG folder here is the user's own,
without the canary DAG, so haflow must add it to what it pushes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

import time

from haflow.cluster import Cluster
from haflow.components import airflow, airflow_api, postgres
from haflow.drills import canary, scenarios
from haflow.drills.runner import DrillOptions, run_drill
from haflow.drills.scenarios import ALL, Fault, Scenario
from haflow.drills.writer import Writer, lost_writes
from haflow.spec import default_spec_text, load_spec

pytestmark = pytest.mark.integration

ADDRESSES = ["127.0.0.44", "127.0.0.45", "127.0.0.46"]
HAFLOW = [sys.executable, "-m", "haflow.cli"]
EXAMPLES = Path(__file__).resolve().parents[2] / "src/haflow/examples/dags"
REQUIRED = {"scenario", "ok", "rto_s", "task_flow_gap_s", "recovered_s", "acknowledged_writes_lost", "dag_runs_failed",
            "tasks_never_executed", "duplicate_executions", "timeline", "fault_took_effect", "canary_triggers_acknowledged",
            "canary_runs_found", "task_instances_retried", "retry_delay_s"}


def haflow(spec: Path, *args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([*HAFLOW, *args, "-f", str(spec)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def env():
    root = Path(tempfile.mkdtemp(prefix="haflow-drill-", dir="/var/tmp"))
    root.chmod(0o755)
    (root / "dags").mkdir()
    shutil.copy(EXAMPLES / "haflow_example.py", root / "dags")  # no canary DAG: haflow adds it
    data = yaml.safe_load(default_spec_text())
    data["cluster"] = "drilltest"
    for node, addr in zip(data["nodes"], ADDRESSES):
        node["address"] = addr
    data["airflow"]["dags"] = "dags"
    data["ports"]["epmd"] = 4374
    path = root / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    cluster = Cluster(load_spec(path), root / ".haflow", spec_dir=root)
    r = haflow(path, "up")
    assert r.returncode == 0, r.stderr[-3000:]
    yield path, cluster
    subprocess.run([*HAFLOW, "down", "-f", str(path)], capture_output=True, timeout=600)
    cluster.kill_all()
    shutil.rmtree(root, ignore_errors=True)
    cluster.host.purge()  # the state dir and what lives outside it (DB, service folders, sockets)


LOCAL = [n for n in ALL if not scenarios.SCENARIOS[n].needs]  # node-partition needs servers with network control


@pytest.mark.parametrize("scenario", LOCAL)
def test_drill_keeps_every_invariant(env, scenario):
    spec, _ = env
    args = ["drill", scenario, "--json"] + (["--hold", "10"] if scenario == "node-crash" else [])
    r = haflow(spec, *args)
    assert r.returncode in (0, 1), r.stderr[-3000:]
    result = json.loads(r.stdout)
    assert REQUIRED <= set(result)
    assert result["scenario"] == scenario
    assert result["violations"] == [] and result["ok"] and r.returncode == 0, result
    assert result["acknowledged_writes"] > 50 and result["acknowledged_writes_lost"] == 0
    assert result["dag_runs"] > 3 and result["dag_runs_failed"] == 0 and result["dag_runs_unfinished"] == 0
    assert result["tasks_never_executed"] == 0
    assert result["recovered_s"] is not None
    assert result["fault_took_effect"] is True
    assert result["canary_runs_found"] == result["canary_triggers_acknowledged"] > 0
    assert result["task_instances_retried"] >= 0 and result["retry_delay_s"] >= 0
    times = [e["t_s"] for e in result["timeline"]]
    assert times == sorted(times)
    assert result["timeline"][0]["event"].startswith("fault: ") or any(e["event"].startswith("fault: ") for e in result["timeline"])


# --- the checks can fail: each shown on the real cluster -----------------------------------------


def test_a_drill_whose_fault_did_nothing_fails(env, monkeypatch):
    _, cluster = env

    def pretend(cluster: Cluster, node: str) -> Fault:  # claims a kill, kills nothing
        running = cluster.host.instance(node, airflow.SCHEDULER)
        return Fault(node, f"pretend to kill the scheduler on {node}", service=airflow.SCHEDULER, killed=(running,))

    monkeypatch.setitem(scenarios.SCENARIOS, "pretend", Scenario("pretend", "a fault that does nothing",
                                                                 lambda c: "node2", pretend))
    # nothing comes back from a kill that did not happen: wait 15 s for it, not the default 300
    result = run_drill(cluster, "pretend", DrillOptions(warmup_s=2, cooldown_s=1, recover_timeout_s=15))
    assert result["fault_took_effect"] is False and not result["ok"]
    assert any("the fault did not take effect" in v and "still runs as the instance" in v for v in result["violations"])


def test_a_lost_write_and_a_missing_dag_run_are_found_in_the_real_database(env):
    _, cluster = env
    account = cluster.secrets["postgres_airflow"]
    writer = Writer(cluster.facts.pg_primary_endpoints, account.username, account.password, cluster.facts.airflow_db,
                    run_id=int(time.time()))
    writer.ensure_table()
    writer.start()
    time.sleep(2)
    log = writer.stop()
    endpoint = postgres.live_primary_endpoint(cluster.facts)
    args = (endpoint, account.username, account.password, cluster.facts.airflow_db)
    assert lost_writes(log, *args) == []
    victim = log.acknowledged[len(log.acknowledged) // 2]
    with postgres.connect_any(cluster.facts, cluster.secrets) as conn:
        conn.execute("DELETE FROM haflow_canary_writes WHERE id = %s", (victim,))  # the loss a drill must report
    assert lost_writes(log, *args) == [victim]

    prefix = f"lost-run-check-{int(time.time())}"
    client = airflow_api.connect(cluster.facts, cluster.secrets)
    r = client.post(f"/dags/{canary.DAG_ID}/dagRuns", {"dag_run_id": f"{prefix}-00001", "logical_date": None, "conf": {}})
    assert r.status_code in (200, 201), r.text
    with postgres.connect_any(cluster.facts, cluster.secrets) as conn:
        found = canary.runs(conn, prefix)
    acknowledged = [f"{prefix}-00001", f"{prefix}-00002"]  # the second was never triggered: "lost"
    assert [a for a in acknowledged if a not in found] == [f"{prefix}-00002"]
