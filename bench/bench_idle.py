"""What a running local cluster costs at rest, per kind of process: CPU (% of one core) over a
window and memory (PSS), for etcd, Patroni, PostgreSQL, HAProxy, RabbitMQ, epmd, each Airflow
component and the supervisors. The first step of making the cluster lean: change only what this
points at, and keep each change's before/after (`--label`).

Attaches to a cluster that is already up (the embedded default unless `-f SPEC`); starts and
stops nothing. Each process is attributed to the service whose process tree holds it (a
PostgreSQL backend to "postgresql", not to Patroni that started it; the dag-processor's elector
apart from the dag-processor it runs). Appends one run to bench/results/idle.json (every earlier
run is kept, by label) and writes the idle section of docs/benchmarks.md.

    .venv/bin/python bench/bench_idle.py --label before [--window 60] [--windows 3] [--settle 120] [-f SPEC]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import psutil

from common import utc_now, write_docs_section
from haflow.cli import make_cluster
from haflow.hosts.local import MACHINE

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench/results/idle.json"


def kind_of(service: str, proc: psutil.Process, is_main: bool) -> str:
    """The kind a process of `service`'s tree counts as."""
    try:
        name = proc.name()
        cmdline = " ".join(proc.cmdline())
    except psutil.Error:
        return service
    if service == "patroni" and name.startswith("postgres"):
        return "postgresql"
    if service == "airflow-dag-processor" and is_main and "dag_processor_elect" in cmdline:
        return "airflow-dag-processor (elector)"
    return service


def leftover_kind(p: psutil.Process) -> str:
    """A process outside every service's tree: the node's supervisor, or a daemon a service
    forked off (Patroni's PostgreSQL detaches from it)."""
    try:
        name, cmdline = p.name(), " ".join(p.cmdline())
    except psutil.Error:
        return "gone"
    if "supervisord" in cmdline:
        return "supervisord"
    return "postgresql" if name.startswith("postgres") else f"forked ({name})"


def attribute(cluster) -> dict[int, tuple[str, psutil.Process]]:
    """pid -> (kind, process) for every live process of the cluster on this machine."""
    host = cluster.host
    found: dict[int, tuple[str, psutil.Process]] = {}
    for node in [MACHINE, *cluster.facts.node_names]:
        services = [s.name for s in cluster.desired(node).services] if node != MACHINE else ["epmd"]
        for service in services:
            main = host.service_proc(node, service)
            if main is None or (p := main.process()) is None:
                continue
            found[p.pid] = (kind_of(service, p, True), p)
            for child in p.children(recursive=True):
                found.setdefault(child.pid, (kind_of(service, child, False), child))
        for ref in host.processes(node):  # the supervisor and what a service forked
            p = ref.process()
            if p is not None and p.pid not in found:
                found[p.pid] = (leftover_kind(p), p)
    return found


def up_for(cluster) -> float:
    """Seconds since the oldest node supervisor started: how long the cluster has been up."""
    starts = [ref.create_time for n in cluster.facts.node_names if (ref := cluster.host.agent(n)) is not None]
    return round(time.time() - min(starts), 1) if starts else 0.0


def cpu_seconds(p: psutil.Process) -> float | None:
    try:
        t = p.cpu_times()
        return t.user + t.system + t.children_user + t.children_system
    except psutil.Error:
        return None


def measure(cluster, window_s: float) -> dict:
    """CPU per kind over the window (processes alive at its end; one that started meanwhile
    counts whole), PSS per kind at the end."""
    start = {pid: cpu_seconds(p) for pid, (_, p) in attribute(cluster).items()}
    time.sleep(window_s)
    end = attribute(cluster)
    kinds: dict[str, dict] = defaultdict(lambda: {"processes": 0, "cpu_s": 0.0, "pss_bytes": 0})
    for pid, (kind, p) in end.items():
        k = kinds[kind]
        now = cpu_seconds(p)
        if now is None:
            continue
        k["processes"] += 1
        k["cpu_s"] += max(0.0, now - (start.get(pid) or 0.0))
        try:
            k["pss_bytes"] += p.memory_full_info().pss
        except psutil.Error:
            pass
    rows = {kind: {"processes": v["processes"], "cpu_pct_of_one_core": round(100 * v["cpu_s"] / window_s, 2),
                   "pss_mib": round(v["pss_bytes"] / 2**20, 1)} for kind, v in sorted(kinds.items())}
    total = {"processes": sum(r["processes"] for r in rows.values()),
             "cpu_pct_of_one_core": round(sum(r["cpu_pct_of_one_core"] for r in rows.values()), 2),
             "pss_mib": round(sum(r["pss_mib"] for r in rows.values()), 1)}
    return {"kinds": rows, "total": total, "processes_gone_during_window": len(set(start) - set(end))}


def measure_windows(cluster, window_s: float, windows: int) -> dict:
    """`windows` consecutive windows: per kind the median CPU and the last PSS; the total CPU of
    every window is kept (one window moves by a fifth from run to run on this machine)."""
    each = [measure(cluster, window_s) for _ in range(windows)]
    if windows == 1:
        return each[0]
    last = each[-1]["kinds"]
    rows = {kind: {"processes": last[kind]["processes"],
                   "cpu_pct_of_one_core": round(statistics.median(w["kinds"].get(kind, {}).get("cpu_pct_of_one_core", 0.0) for w in each), 2),
                   "pss_mib": last[kind]["pss_mib"]} for kind in sorted(last)}
    per_window = [w["total"]["cpu_pct_of_one_core"] for w in each]
    total = {"processes": sum(r["processes"] for r in rows.values()),
             "cpu_pct_of_one_core": round(statistics.median(per_window), 2),
             "cpu_pct_of_one_core_per_window": per_window,
             "pss_mib": round(sum(r["pss_mib"] for r in rows.values()), 1)}
    return {"kinds": rows, "total": total, "windows": windows,
            "processes_gone_during_window": sum(w["processes_gone_during_window"] for w in each)}


def per_kind_table(runs: list[dict]) -> list[str]:
    """CPU % of one core / PSS MiB of every kind in every run: where each change took effect."""
    kinds = sorted({k for r in runs for k in r["kinds"]}, key=lambda k: -runs[-1]["kinds"].get(k, {}).get("cpu_pct_of_one_core", 0))

    def cell(r: dict, k: str) -> str:
        v = r["kinds"].get(k)
        return f"{v['cpu_pct_of_one_core']} / {v['pss_mib']:.0f}" if v else "-"
    return ["Per kind, every run (CPU % of one core / PSS MiB):", "",
            "| kind | " + " | ".join(f"`{r['label']}`" for r in runs) + " |",
            "|---|" + "---|" * len(runs),
            *[f"| {k} | " + " | ".join(cell(r, k) for r in runs) + " |" for k in kinds], ""]


def cpu_cell(run: dict) -> str:
    """The run's CPU; with several windows, their median and every window's figure."""
    t = run["total"]
    each = t.get("cpu_pct_of_one_core_per_window")
    return f"{t['cpu_pct_of_one_core']} %" + (f" (median of {len(each)} windows: {', '.join(map(str, each))})" if each else "")


def write_section(results: dict) -> None:
    runs = results["runs"]
    latest = runs[-1]
    lines = [
        "## Idle cost per component",
        "",
        f"Measured by `bench/bench_idle.py`: the running cluster ({latest['cluster']}, {latest['nodes']} nodes "
        f"on this machine) up for {latest['up_for_s']:.0f} s, over a {latest['window_s']:.0f} s window; "
        f"every process attributed to the service whose process tree holds it. {latest.get('windows', 1)} window(s) in the latest run (CPU: per kind the median); raw data "
        f"in `bench/results/idle.json`. Latest run: `{latest['label']}` ({latest['at']}).",
        "",
        "| kind | processes | CPU, % of one core | PSS |",
        "|---|---|---|---|",
    ]
    by_cpu = sorted(latest["kinds"].items(), key=lambda kv: -kv[1]["cpu_pct_of_one_core"])
    lines += [f"| {k} | {v['processes']} | {v['cpu_pct_of_one_core']} % | {v['pss_mib']} MiB |" for k, v in by_cpu]
    t = latest["total"]
    lines += [f"| **total** | {t['processes']} | **{t['cpu_pct_of_one_core']} %** | **{t['pss_mib']} MiB** |", ""]
    if len(runs) > 1:
        lines += ["Every run (before and after each change):", "", "| run | when | CPU, % of one core | PSS |", "|---|---|---|---|"]
        lines += [f"| `{r['label']}` | {r['at']} | {cpu_cell(r)} | {r['total']['pss_mib']} MiB |"
                  for r in runs]
        lines.append("")
        lines += per_kind_table(runs)
    write_docs_section(ROOT / "docs/benchmarks.md", lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", required=True, help="what this run measures, e.g. before, after-etcd-heartbeat")
    ap.add_argument("--window", type=float, default=60)
    ap.add_argument("--windows", type=int, default=1, help="consecutive windows; CPU is their median")
    ap.add_argument("--settle", type=float, default=120, help="wait this long first (a cluster just up is busy)")
    ap.add_argument("-f", "--file", type=Path, default=None, help="cluster spec (default: the embedded one)")
    ap.add_argument("--state-dir", type=Path, default=None)
    args = ap.parse_args()
    cluster = make_cluster(args.file, args.state_dir, lambda m: None)
    if not cluster.host.running(cluster.facts.node_names[0]):
        raise SystemExit("the cluster is not running here: `haflow up` first (this benchmark starts nothing)")
    print(f"settling {args.settle:.0f} s, then measuring {args.window:.0f} s", flush=True)
    time.sleep(args.settle)
    run = {"label": args.label, "at": utc_now(), "cluster": cluster.facts.name,
           "nodes": len(cluster.facts.node_names), "up_for_s": up_for(cluster), "window_s": args.window,
           **measure_windows(cluster, args.window, args.windows)}
    results = json.loads(OUT.read_text()) if OUT.exists() else {"runs": []}
    results["runs"].append(run)
    results["summary"] = {"latest": run["label"], "total": run["total"]}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    write_section(results)
    print(json.dumps(run, indent=2))


if __name__ == "__main__":
    main()
