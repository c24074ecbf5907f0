"""Benchmark of the lab: how long `haflow lab up` takes from nothing (base image cached) until
every host answers over SSH with a running systemd, how long a no-op `lab up` and `lab down`
take, and what the idle hosts cost. Needs root.

Writes bench/results/lab.json and the lab section of docs/benchmarks.md.

    .venv/bin/python bench/bench_lab.py [--reps 3] [--nodes 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import psutil

from common import resources, save_results, utc_now, write_docs_section
from haflow.lab import Lab, image

ROOT = Path(__file__).resolve().parent.parent


def host_processes(lab: Lab) -> list[psutil.Process]:
    """Every process of the hosts (each host's init and what runs under it) and their nspawn."""
    procs = []
    for h in lab.hosts():
        for ref in h.refs():
            p = ref.process()
            if p:
                procs.append(p)
                procs += p.children(recursive=True) if ref.label.endswith("init") else []
    return procs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--release", default=image.DEFAULT_RELEASE)
    ap.add_argument("--idle-window", type=float, default=30)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/lab.json")
    args = ap.parse_args()
    lab = Lab(say=lambda m: print(f"    {m}", flush=True))
    lab.down()  # from nothing (the base image stays cached)
    image.ensure_base(lab.cache, args.release, print)
    runs = []
    for rep in range(args.reps):
        print(f"rep {rep + 1}/{args.reps}", flush=True)
        t = time.monotonic()
        lab.up(args.nodes, args.release)
        up_s = time.monotonic() - t
        t = time.monotonic()
        lab.up(args.nodes, args.release)
        noop_s = time.monotonic() - t
        idle = resources(host_processes(lab), args.idle_window) if rep == 0 else None
        t = time.monotonic()
        lab.down()
        down_s = time.monotonic() - t
        runs.append({"up_s": round(up_s, 2), "noop_up_s": round(noop_s, 2), "down_s": round(down_s, 2), "idle": idle})
        print(f"    up {up_s:.2f} s, no-op up {noop_s:.2f} s, down {down_s:.2f} s", flush=True)
    summary = {k: {"median": round(statistics.median(r[k] for r in runs), 2), "max": round(max(r[k] for r in runs), 2)}
               for k in ("up_s", "noop_up_s", "down_s")}
    summary["idle"] = runs[0]["idle"]
    results = {"runs": runs, "summary": summary,
               "meta": {"date": utc_now(), "reps": args.reps,
                        "nodes": args.nodes, "release": args.release, "idle_window_s": args.idle_window}}
    save_results(results, args.out, write_section)


def write_section(r: dict) -> None:
    m, s = r["meta"], r["summary"]
    idle = s["idle"]
    lines = [
        "## The lab",
        "",
        f"Measured by `bench/bench_lab.py` on {m['date']}: {m['reps']} repetitions with {m['nodes']} {m['release']} hosts,",
        "the base image cached; raw data in `bench/results/lab.json`.",
        "",
        "| measure | median | max |",
        "|---|---|---|",
        f"| `lab up` from nothing until every host answers over SSH with systemd running | {s['up_s']['median']} s | {s['up_s']['max']} s |",
        f"| `lab up` again (nothing to do) | {s['noop_up_s']['median']} s | {s['noop_up_s']['max']} s |",
        f"| `lab down`, verified | {s['down_s']['median']} s | {s['down_s']['max']} s |",
        "",
        f"Idle, {m['nodes']} hosts ({idle['processes']} processes, over {idle['window_s']:.0f} s): "
        f"{idle['pss_mib']} MiB PSS, {idle['idle_cpu_pct_of_one_core']} % of one core.",
        "",
    ]
    write_docs_section(ROOT / "docs/benchmarks.md", lines)


if __name__ == "__main__":
    main()
