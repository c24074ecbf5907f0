"""Benchmark of the failure drills: write RTO, task-flow gap and time to healthy for every
scenario, `--reps` times each (median and max), on a fresh cluster of its own (127.0.0.51-53).

Writes bench/results/drills.json and the results section of docs/drills.md. Stops every process
it started, by PID.

    .venv/bin/python bench/bench_drills.py [--reps 5] [--scenarios node-crash,switchover]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import yaml

from common import save_results, utc_now, write_docs_section
from haflow.cluster import Cluster
from haflow.drills.runner import DrillOptions, run_drill
from haflow.drills.scenarios import ALL
from haflow.spec import default_spec_text, parse_spec

ROOT = Path(__file__).resolve().parent.parent
ADDRESSES = ["127.0.0.51", "127.0.0.52", "127.0.0.53"]
TARGETS = {  # the targets on this machine (field, limit)
    "node-crash": ("rto_s", 18.0),
    "db-primary-crash": ("rto_s", 18.0),
    "switchover": ("write_gap_s", 3.0),
    "broker-node-crash": ("task_flow_gap_s", 5.0),
}
MEASURES = ("rto_s", "write_gap_s", "task_flow_gap_s", "recovered_s", "retry_delay_s")


def make_cluster(state: Path) -> Cluster:
    data = yaml.safe_load(default_spec_text())
    data["cluster"] = "benchdrill"
    for node, addr in zip(data["nodes"], ADDRESSES):
        node["address"] = addr
    data["ports"]["epmd"] = 4372
    return Cluster(parse_spec(data), state, say=lambda m: print(f"    {m}", flush=True))


def summarize(runs: list[dict]) -> dict:
    out = {}
    for m in MEASURES:
        values = [r[m] for r in runs if r[m] is not None]
        out[m] = {"median": round(statistics.median(values), 2), "max": round(max(values), 2)} if values else None
    out["all_ok"] = all(r["ok"] for r in runs)
    out["acknowledged_writes_lost"] = sum(r["acknowledged_writes_lost"] for r in runs)
    out["dag_runs_failed"] = sum(r["dag_runs_failed"] for r in runs)
    out["tasks_never_executed"] = sum(r["tasks_never_executed"] for r in runs)
    out["duplicate_executions"] = sum(r["duplicate_executions"] for r in runs)
    out["faults_took_effect"] = all(r.get("fault_took_effect", False) for r in runs)
    out["canary_triggers_acknowledged"] = sum(r.get("canary_triggers_acknowledged", 0) for r in runs)
    out["canary_runs_found"] = sum(r.get("canary_runs_found", 0) for r in runs)
    out["task_instances_retried"] = sum(r.get("task_instances_retried", 0) for r in runs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--scenarios", default=",".join(ALL))
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/drills.json")
    ap.add_argument("--append", action="store_true", help="add these repetitions to the runs already in --out")
    args = ap.parse_args()
    names = args.scenarios.split(",")

    root = Path(tempfile.mkdtemp(prefix="haflow-benchdrill-", dir="/var/tmp"))
    root.chmod(0o755)
    cluster = make_cluster(root / ".haflow")
    results: dict = {"runs": {n: [] for n in names}}
    earlier = json.loads(args.out.read_text()) if args.append and args.out.exists() else None
    if earlier:  # earlier repetitions (on their own fresh cluster) count too; other scenarios stay
        results["runs"] = {**earlier["runs"], **{n: earlier["runs"].get(n, []) for n in names}}
    try:
        cluster.ensure_prerequisites()
        cluster.up(smoke=True)
        for rep in range(args.reps):
            for name in names:
                print(f"{name} {rep + 1}/{args.reps}", flush=True)
                r = run_drill(cluster, name, DrillOptions(), say=lambda m: print(f"    {m}", flush=True))
                print(f"    ok={r['ok']} rto={r['rto_s']} gap={r['write_gap_s']} flow={r['task_flow_gap_s']} "
                      f"healthy={r['recovered_s']} {r['violations']}", flush=True)
                results["runs"][name].append(r)
    finally:
        cluster.down()
        cluster.kill_all()
        shutil.rmtree(root, ignore_errors=True)
        cluster.host.purge()  # the state dir and what lives outside it (DB, service folders, sockets)

    results["summary"] = {n: summarize(runs) for n, runs in results["runs"].items() if runs}
    reps = min(len(runs) for runs in results["runs"].values())  # the scenario repeated least
    results["meta"] = {"date": utc_now(), "reps": reps,
                       "sessions": (earlier["meta"].get("sessions", 1) + 1) if earlier else 1,
                       "loop_wait": cluster.spec.database.loop_wait, "ttl": cluster.spec.database.ttl}
    save_results(results, args.out, write_section)


def write_section(r: dict) -> None:
    m = r["meta"]
    lines = [
        "## Latest results on this machine",
        "",
        f"Measured by `bench/bench_drills.py` (last on {m['date']}): each scenario {m['reps']} times on a fresh default",
        f"cluster (ttl {m['ttl']}, loop_wait {m['loop_wait']}; {m.get('sessions', 1)} benchmark run(s), each on its own fresh",
        "cluster); raw data with every timeline in `bench/results/drills.json`.",
        "",
        "Every fault was checked to have taken effect, and every acknowledged canary trigger to exist as a DAG run"
        " (columns `fault` and `runs found`). Retried: canary task instances that needed a retry, over all repetitions,"
        " and the time retries added per drill (median / max).",
        "",
        "| scenario | write RTO median / max | write gap median / max | task-flow gap median / max | healthy after median / max | invariants (lost writes, failed runs, never executed) | fault | runs found / acknowledged | retried (added) | duplicates | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in r["summary"].items():
        def mm(k: str) -> str:
            return f"{s[k]['median']} / {s[k]['max']} s" if s.get(k) else "-"
        target = ""
        if name in TARGETS:
            field, limit = TARGETS[name]
            got = s[field]["median"] if s[field] else None
            target = f"{field.replace('_s', '').replace('_', ' ')} <= {limit} s: " + ("met" if got is not None and got <= limit else "**missed**")
        elif name in ("scheduler-crash", "api-server-crash"):
            target = "no failed task: " + ("met" if s["dag_runs_failed"] == 0 and s["tasks_never_executed"] == 0 else "**missed**")
        inv = "all kept" if s["all_ok"] else "**broken**"
        lines.append(f"| {name} | {mm('rto_s')} | {mm('write_gap_s')} | {mm('task_flow_gap_s')} | {mm('recovered_s')} | "
                     f"{inv} ({s['acknowledged_writes_lost']}, {s['dag_runs_failed']}, {s['tasks_never_executed']}) | "
                     f"{'took effect' if s.get('faults_took_effect') else '**no effect**'} | "
                     f"{s.get('canary_runs_found', '-')} / {s.get('canary_triggers_acknowledged', '-')} | "
                     f"{s.get('task_instances_retried', '-')} ({mm('retry_delay_s')}) | "
                     f"{s['duplicate_executions']} | {target} |")
    lines.append("")
    write_docs_section(ROOT / "docs/drills.md", lines)

if __name__ == "__main__":
    main()
