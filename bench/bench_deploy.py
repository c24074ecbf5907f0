"""Benchmark of `haflow deploy` on the lab: a cold deploy of the full cluster to fresh hosts (the
lab's base image and this machine's wheelhouse cached, as on a second deploy to new servers),
no-op re-deploys, and a rolling change of a PostgreSQL parameter that needs a restart. Needs root.

Writes bench/results/deploy.json and the deploy section of docs/benchmarks.md.

    .venv/bin/python bench/bench_deploy.py [--noop-reps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from common import save_results, utc_now, write_docs_section
from haflow.lab import Lab

ROOT = Path(__file__).resolve().parent.parent
HAFLOW = [sys.executable, "-m", "haflow.cli"]


def haflow(*args: str) -> tuple[float, dict]:
    t = time.monotonic()
    r = subprocess.run([*HAFLOW, *args], capture_output=True, text=True)
    wall = time.monotonic() - t
    if r.returncode != 0:
        sys.exit(f"haflow {' '.join(args)} failed ({r.returncode}): {r.stderr[-2000:]}")
    return wall, json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--noop-reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/deploy.json")
    args = ap.parse_args()
    lab = Lab(say=lambda m: print(f"    {m}", flush=True))
    lab.down()  # fresh hosts: packages, users, venvs and the cluster all from nothing
    info = lab.up(3)
    spec = Path(info["spec"])
    print("cold deploy", flush=True)
    cold_wall, cold = haflow("deploy", "-f", str(spec), "--json")
    noops = []
    for rep in range(args.noop_reps):
        wall, r = haflow("deploy", "-f", str(spec), "--json", "--no-smoke")
        assert r["deploy"]["changed"] == [], r["deploy"]["changed"]
        noops.append({"wall_s": round(wall, 2), "deploy_s": r["deploy"]["elapsed_s"]})
        print(f"no-op deploy {rep + 1}: {wall:.2f} s wall, {r['deploy']['elapsed_s']} s in deploy", flush=True)
    data = yaml.safe_load(spec.read_text())
    data["database"]["parameters"]["max_connections"] = 205
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    roll_wall, roll = haflow("deploy", "-f", str(spec), "--json", "--no-smoke")
    restarted = [c for c in roll["deploy"]["changed"] if "restarted PostgreSQL" in c]
    print(f"rolling change: {roll_wall:.1f} s, {len(restarted)} PostgreSQL restarts", flush=True)
    haflow("down", "-f", str(spec), "--purge", "--yes")
    lab.down()
    summary = {
        "cold_deploy_s": round(cold_wall, 1), "cold_deploy_inside_s": cold["deploy"]["elapsed_s"],
        "example_dag_s": cold["deploy"]["example_dag"]["duration_s"],
        "noop_wall_s": {"median": round(statistics.median(n["wall_s"] for n in noops), 2), "max": max(n["wall_s"] for n in noops)},
        "noop_deploy_s": {"median": round(statistics.median(n["deploy_s"] for n in noops), 2), "max": max(n["deploy_s"] for n in noops)},
        "rolling_change_s": round(roll_wall, 1), "rolling_postgres_restarts": len(restarted),
    }
    results = {"runs": {"cold": {"wall_s": round(cold_wall, 1), "changed": len(cold["deploy"]["changed"])},
                        "noop": noops, "rolling": {"wall_s": round(roll_wall, 1), "changed": roll["deploy"]["changed"]}},
               "summary": summary,
               "meta": {"date": utc_now(), "hosts": 3, "release": info["release"],
                        "noop_reps": args.noop_reps}}
    save_results(results, args.out, write_section)


def write_section(r: dict) -> None:
    m, s = r["meta"], r["summary"]
    lines = [
        "## Deploying to servers (the lab)",
        "",
        f"Measured by `bench/bench_deploy.py` on {m['date']}: {m['hosts']} fresh {m['release']} lab hosts, the lab's base",
        "image and this machine's wheelhouse cached; one cold deploy, one rolling change and",
        f"{m['noop_reps']} no-op re-deploys; raw data in `bench/results/deploy.json`. Wall time includes",
        "starting the CLI and the status shown at the end; \"inside\" is the deploy's own `elapsed_s`.",
        "",
        "| measure | figure | target |",
        "|---|---|---|",
        f"| cold deploy (apt, users, venvs, every layer, the example DAG) | {s['cold_deploy_s']} s wall "
        f"({s['cold_deploy_inside_s']} s inside; example DAG {s['example_dag_s']} s) | <= 360 s: "
        f"{'met' if s['cold_deploy_s'] <= 360 else '**missed**'} |",
        f"| no-op re-deploy | median {s['noop_wall_s']['median']} s wall, max {s['noop_wall_s']['max']} s "
        f"({s['noop_deploy_s']['median']} s inside) | <= 5 s: {'met' if s['noop_wall_s']['median'] <= 5 else '**missed**'} |",
        f"| rolling change of `max_connections` ({s['rolling_postgres_restarts']} PostgreSQL restarts, one switchover) | "
        f"{s['rolling_change_s']} s wall | - |",
        "",
    ]
    write_docs_section(ROOT / "docs/benchmarks.md", lines)


if __name__ == "__main__":
    main()
