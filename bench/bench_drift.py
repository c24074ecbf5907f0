"""Why the HA cluster's later throughput runs are slower than its first (bench_airflow's pairs:
9.04, 8.96, 7.66 tasks/s in one pair; every pair falls the same way, and a restart resets it).

Brings the HA cluster of bench_airflow up on its own addresses (127.0.0.51-53), then runs
haflow_noop100 back to back `--runs` times. For each run it records tasks/s, where the tasks'
time went (scheduled -> queued -> started -> ended, medians over the run's task instances), the
CPU seconds each kind of process spent during the run, and each kind's PSS after it: whatever
grows from run to run is what slows the later ones. Stops every process it started and purges
the cluster. Writes bench/results/drift.json and a section of docs/benchmarks.md.

    .venv/bin/python bench/bench_drift.py [--runs 8] [--gap 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

from bench_airflow import THROUGHPUT_DAG, make_cluster, run_throughput_dag, wait_for_throughput_dag
from bench_idle import attribute, cpu_seconds
from common import save_results, utc_now, write_docs_section
from haflow.components import airflow_api

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench/results/drift.json"
PHASES = (("scheduled_when", "queued_when", "scheduled_to_queued_s"), ("queued_when", "start_date", "queued_to_started_s"),
          ("start_date", "end_date", "started_to_ended_s"))


def stamp(value: str | None) -> float | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() if value else None


def phases(tis: list[dict]) -> dict[str, float]:
    """Median seconds of each phase over the run's task instances."""
    out = {}
    for start, end, name in PHASES:
        spans = [e - s for ti in tis if (s := stamp(ti.get(start))) is not None and (e := stamp(ti.get(end))) is not None]
        out[name] = round(statistics.median(spans), 3) if spans else None
    return out


def kind_usage(cluster) -> dict[str, tuple[float, float]]:
    """kind -> (CPU seconds so far, PSS bytes) of every live process of the cluster."""
    usage: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for kind, p in attribute(cluster).values():
        cpu = cpu_seconds(p)
        if cpu is None:
            continue
        usage[kind][0] += cpu
        try:
            usage[kind][1] += p.memory_full_info().pss
        except Exception:
            pass
    return {k: (v[0], v[1]) for k, v in usage.items()}


def one_run(client: airflow_api.ApiClient, cluster) -> dict:
    before = kind_usage(cluster)
    run_id, elapsed = run_throughput_dag(client)
    after = kind_usage(cluster)
    cpu = {k: round(after[k][0] - before.get(k, (0.0, 0.0))[0], 2) for k in sorted(after)}
    pss = {k: round(after[k][1] / 2**20, 1) for k in sorted(after)}
    return {"run_id": run_id, "elapsed_s": round(elapsed, 2), "tasks_per_s": round(100 / elapsed, 2),
            **phases(client.task_instances(THROUGHPUT_DAG, run_id)), "cpu_s_by_kind": cpu, "pss_mib_by_kind": pss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--gap", type=float, default=10, help="seconds between runs (bench_airflow: ~1)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="haflow-drift-"))
    cluster = make_cluster(root / "state")
    runs = []
    try:
        cluster.up(smoke=False)
        client = airflow_api.connect(cluster.facts, cluster.secrets)
        wait_for_throughput_dag(client)
        time.sleep(30)  # start-up work settles
        for i in range(args.runs):
            run = one_run(client, cluster)
            runs.append(run)
            print(f"run {i + 1}/{args.runs}: {run['elapsed_s']} s, {run['tasks_per_s']} tasks/s, "
                  f"queued->started {run['queued_to_started_s']} s, started->ended {run['started_to_ended_s']} s", flush=True)
            time.sleep(args.gap)
    finally:
        cluster.down()
        cluster.kill_all()
        cluster.host.purge()
    first, rest = runs[1], runs[2:]  # run 1 is the warm-up, as in bench_airflow
    for run in runs:
        run["cpu_s_total"] = round(sum(run["cpu_s_by_kind"].values()), 2)
    results = {"runs": runs, "meta": {"date": utc_now(), "runs": args.runs, "gap_s": args.gap, "machine_cores": os.cpu_count()},
               "summary": {"tasks_per_s": [r["tasks_per_s"] for r in runs],
                           "cpu_s_growth_by_kind": {k: round(statistics.median(r["cpu_s_by_kind"].get(k, 0) for r in rest)
                                                             - first["cpu_s_by_kind"].get(k, 0), 2)
                                                    for k in first["cpu_s_by_kind"]}}}
    save_results(results, args.out, write_section)


def write_section(r: dict) -> None:
    runs = r["runs"]
    kinds = sorted(runs[0]["cpu_s_by_kind"], key=lambda k: -runs[-1]["cpu_s_by_kind"].get(k, 0))[:6]
    lines = ["## Throughput drift within one HA cluster's life (bench/bench_drift.py)", "",
             f"haflow_noop100 run {r['meta']['runs']} times back to back on one HA cluster, {r['meta']['gap_s']} s apart "
             f"(measured {r['meta']['date']}, `bench/results/drift.json`; run 1 is the warm-up). Phase columns are medians "
             "over the run's 100 task instances; CPU is what each kind of process spent during the run.", "",
             "| run | tasks/s | scheduled→queued s | queued→started s | started→ended s | CPU s, all | share of the "
             f"machine's {r['meta']['machine_cores']} cores | " + " | ".join(f"CPU s {k}" for k in kinds) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(kinds)]
    for i, run in enumerate(runs, 1):
        share = run["cpu_s_total"] / (r["meta"]["machine_cores"] * run["elapsed_s"])
        lines.append(f"| {i} | {run['tasks_per_s']} | {run['scheduled_to_queued_s']} | {run['queued_to_started_s']} | "
                     f"{run['started_to_ended_s']} | {run['cpu_s_total']} | {share:.0%} | "
                     + " | ".join(str(run['cpu_s_by_kind'].get(k, 0)) for k in kinds) + " |")
    write_docs_section(ROOT / "docs/benchmarks.md", lines + [""])


if __name__ == "__main__":
    main()
