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

from haflow.cluster import Cluster
from haflow.drills.scenarios import ALL
from haflow.spec import default_spec_text, load_spec

pytestmark = pytest.mark.integration

ADDRESSES = ["127.0.0.44", "127.0.0.45", "127.0.0.46"]
HAFLOW = [sys.executable, "-m", "haflow.cli"]
EXAMPLES = Path(__file__).resolve().parents[2] / "src/haflow/examples/dags"
REQUIRED = {"scenario", "ok", "rto_s", "task_flow_gap_s", "recovered_s", "acknowledged_writes_lost", "dag_runs_failed",
            "tasks_never_executed", "duplicate_executions", "timeline"}


def haflow(spec: Path, *args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([*HAFLOW, *args, "-f", str(spec)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def spec():
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
    yield path
    subprocess.run([*HAFLOW, "down", "-f", str(path)], capture_output=True, timeout=600)
    cluster.kill_all()
    shutil.rmtree(root, ignore_errors=True)
    cluster.host.purge()  # the state dir and what lives outside it (DB, service folders, sockets)


@pytest.mark.parametrize("scenario", ALL)
def test_drill_keeps_every_invariant(spec, scenario):
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
    assert result["timeline"][0]["event"].startswith("fault: ") or any(e["event"].startswith("fault: ") for e in result["timeline"])
