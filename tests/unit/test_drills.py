"""The drill's bookkeeping: gaps, the task invariants, the DAG bundle and the CLI's bad input."""

import subprocess
import sys

import pytest

from haflow import dags
from haflow.fsutil import tree_checksum
from haflow.drills import canary
from haflow.drills.scenarios import ALL, SCENARIOS

HAFLOW = [sys.executable, "-m", "haflow.cli"]


def test_longest_gap_counts_the_window_edges():
    assert canary.longest_gap([], 10.0, 15.0) == (5.0, 10.0)
    assert canary.longest_gap([11.0, 12.0, 14.5], 10.0, 15.0) == (2.5, 12.0)
    # events outside the window do not shorten a gap inside it
    assert canary.longest_gap([1.0, 20.0], 10.0, 12.0) == (2.0, 10.0)


def _row(run, idx, attempt=1):
    return {"run_id": run, "task_id": "probe", "map_index": idx, "try_number": attempt, "node": "node1",
            "started": 1.0, "finished": 2.0}


def test_verdict_all_good():
    states = {"r1": "success", "r2": "success"}
    rows = [_row(r, i) for r in states for i in range(canary.TASKS_PER_RUN)]
    v = canary.verdict(states, rows, [])
    assert v == {"dag_runs": 2, "dag_runs_failed": 0, "dag_runs_unfinished": 0, "task_instances": 6,
                 "task_executions": 6, "tasks_never_executed": 0, "duplicate_executions": 0}


def test_verdict_counts_failures_missing_and_duplicates():
    states = {"r1": "success", "r2": "failed", "r3": "running"}
    rows = [_row("r1", 0), _row("r1", 0, 2), _row("r1", 1), _row("r1", 2), _row("r2", 0)]
    v = canary.verdict(states, rows, [("r1", "probe", 0, "success")])
    assert v["dag_runs_failed"] == 1 and v["dag_runs_unfinished"] == 1
    assert v["duplicate_executions"] == 1
    assert v["tasks_never_executed"] == 2 + 3  # r2 misses 1 and 2, r3 never ran
    assert v["task_instances"] == 9


def test_every_scenario_of_the_issue_exists():
    assert ALL == ["db-primary-crash", "node-crash", "node-partition", "broker-partition", "broker-node-crash", "scheduler-crash", "api-server-crash",
                   "worker-crash", "etcd-leader-crash", "switchover"]
    assert all(SCENARIOS[n].summary for n in ALL)


def test_canary_dag_ships_with_the_examples_and_matches_the_runner():
    text = dags.canary_dag_source().read_text()
    assert f'dag_id="{canary.DAG_ID}"' in text
    assert f"TABLE = \"{canary.TABLE}\"" in text and f"TASKS = {canary.TASKS_PER_RUN}" in text
    # triggered by hand, the DAG creates the very table the drill creates
    ns: dict = {}
    exec(text[text.index("TABLE = "):text.index("def _create_table")], ns)
    assert ns["DDL"] == canary.DDL


def test_bundle_checksum_with_extras_equals_the_staged_copy(tmp_path):
    src = tmp_path / "dags"
    src.mkdir()
    (src / "mine.py").write_text("x = 1\n")
    extras = dags.extras(src)
    assert list(extras) == [dags.CANARY_DAG_FILE]
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "mine.py").write_text("x = 1\n")
    (staged / dags.CANARY_DAG_FILE).write_bytes(dags.canary_dag_source().read_bytes())
    assert tree_checksum(src, extras) == tree_checksum(staged)
    assert dags.extras(staged) == {}


@pytest.mark.parametrize("args, needle", [
    (["drill", "no-such-drill"], "Invalid value for 'SCENARIO'"),
    (["drill", "node-crash", "--node", "nodeX"], "nodeX"),
    (["drill", "all", "--repeat", "0"], "--repeat"),
])
def test_drill_bad_input_exits_2(tmp_path, args, needle):
    r = subprocess.run([*HAFLOW, *args, "--state-dir", str(tmp_path / "state")], capture_output=True, text=True)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_drill_on_a_stopped_cluster_exits_1_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HAFLOW_ADDRESSES", "127.0.0.94,127.0.0.95,127.0.0.96")  # nothing runs there
    r = subprocess.run([*HAFLOW, "drill", "scheduler-crash", "--state-dir", str(tmp_path / "state")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: node1, node2, node3 are down") and "haflow up" in lines[-1]


# --- the report's invariants, each shown breaking ---------------------------------------------


def _report(effect=(True, ""), triggered=("p-00001", "p-00002"), states=None, lost=(), healthy=True, errors=()):
    from haflow.drills.monitor import Timeline
    from haflow.drills.runner import _report as report
    from haflow.drills.scenarios import Fault
    from haflow.drills.writer import WriteLog

    t0 = 1000.0
    states = {"p-00001": "success", "p-00002": "success"} if states is None else states
    rows = [_row(r, i) for r in states for i in range(canary.TASKS_PER_RUN)]
    wlog = WriteLog(acknowledged=[1, 2, 3], ack_times=[999.0, 1001.0, 1002.0], errors=list(errors))
    tlog = canary.TriggerLog(triggered=[(t0 + i, r) for i, r in enumerate(triggered)])
    fault = Fault("node1", "SIGKILL the scheduler on node1", service="airflow-scheduler")
    return report("scheduler-crash", SCENARIOS["scheduler-crash"], fault, effect, t0, t0 + 1, t0 + 5 if healthy else None,
                  t0 + 10, wlog, tlog, states, rows, [], {"retried": 2, "delay_s": 31.5}, list(lost), Timeline(), [])


def test_report_keeps_every_invariant_of_a_good_drill():
    r = _report()
    assert r["ok"] and r["violations"] == []
    assert (r["fault_took_effect"], r["canary_triggers_acknowledged"], r["canary_runs_found"]) == (True, 2, 2)
    assert (r["task_instances_retried"], r["retry_delay_s"]) == (2, 31.5)


def test_the_report_counts_the_writes_clients_saw_fail_from_the_fault_on():
    """What a switchover without client errors is measured by (beside `write_gap_s`, the longest
    stall): failed writes from the fault on; one before the fault does not count."""
    assert _report()["client_errors"] == 0
    r = _report(errors=[(999.5, "OperationalError"), (1000.5, "OperationalError"), (1000.6, "ReadOnlySqlTransaction")])
    assert r["client_errors"] == 2


def test_a_fault_without_effect_breaks_the_drill():
    r = _report(effect=(False, "airflow-scheduler on node1 still runs"))
    assert not r["ok"] and r["fault_took_effect"] is False
    assert r["violations"] == ["the fault did not take effect: airflow-scheduler on node1 still runs"]


def test_an_acknowledged_trigger_without_a_dag_run_breaks_the_drill():
    r = _report(triggered=("p-00001", "p-00002", "p-00003"))
    assert not r["ok"] and r["canary_runs_found"] == 2 and r["canary_triggers_acknowledged"] == 3
    assert r["violations"] == ["1 acknowledged canary triggers have no DAG run (first: p-00003)"]


def test_a_drill_without_canary_runs_fails():
    r = _report(triggered=(), states={})
    assert not r["ok"] and "no canary DAG run was acknowledged" in r["violations"][0]


def test_a_lost_write_breaks_the_drill():
    r = _report(lost=[2])
    assert not r["ok"] and r["violations"] == ["1 acknowledged writes lost"]
