"""Benchmark of the real-network drills on the lab: `node-crash` (the primary's server powered
off hard, booted again after the hold; its own systemd brings the node back) and
`node-partition` (the primary's server cut off from everything, healed after the majority has a
primary), `--reps` times each, interleaved, through the real `haflow drill -f SPEC --json`; and
how fast the lab's stand-in cloud balancer (`lab up --balancer`, configured only from `haflow lb
settings`) follows a planned switchover, `--lb-reps` times (`haflow lb check --switchover`); and
`broker-partition` (only RabbitMQ's links of the queue leader's server cut), `--broker-reps`
times. Needs root.

Brings the lab up and deploys to it when it is not already there (and then takes both down at
the end); a lab that was up is left as it was. Writes bench/results/lab_drills.json and the
real-network section of docs/drills.md, next to the loopback figures of bench_drills.py.

    .venv/bin/python bench/bench_lab_drills.py [--reps 5] [--hold 15] [--lb-reps 5] [--broker-reps 5]
                                               [--only drills|lb|broker]

`--only` runs one part and keeps the other parts' runs from the results file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import save_results, utc_now, write_docs_section
from haflow.lab import Lab

ROOT = Path(__file__).resolve().parent.parent
HAFLOW = [sys.executable, "-m", "haflow.cli"]
SCENARIOS = ("node-crash", "node-partition")
BROKER = "broker-partition"
MEASURES = ("rto_s", "write_gap_s", "task_flow_gap_s", "recovered_s", "majority_primary_s",
            "isolated_primary_refuses_writes_s", "broker_cut_seen_s", "broker_paused_s", "queue_leader_moved_s")


def haflow(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([*HAFLOW, *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        sys.exit(f"haflow {' '.join(args)} failed ({r.returncode}): {r.stderr[-2000:]}")
    return r


def lb_check(spec: str, endpoint: str) -> dict:
    """One `lb check --switchover` through the stand-in balancer, once the cluster can switch
    over safely (a synchronous standby streams again after the previous one)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        snap = json.loads(haflow("status", "--json", "-f", spec, check=False).stdout or "{}")
        if snap.get("healthy"):
            break
        time.sleep(3)
    r = haflow("lb", "check", endpoint, "--switchover", "--json", "-f", spec, check=False)
    if not r.stdout.strip().startswith("{"):
        sys.exit(f"lb check gave no result ({r.returncode}): {r.stderr[-2000:]}")
    result = json.loads(r.stdout)
    print(f"    ok={result['ok']} follow={result['follow_s']} switchover={result['switchover_s']} "
          f"closed={result['old_connections_closed']} {result['problems']}", flush=True)
    return result


def summarize_lb(runs: list[dict]) -> dict:
    out: dict = {"runs": len(runs), "all_ok": all(r["ok"] for r in runs),
                 "old_connections_closed": all(r["old_connections_closed"] for r in runs)}
    for m in ("follow_s", "switchover_s"):
        values = [r[m] for r in runs if r.get(m) is not None]
        out[m] = {"median": round(statistics.median(values), 2), "max": round(max(values), 2)} if values else None
    return out


def summarize(runs: list[dict]) -> dict:
    out: dict = {}
    for m in MEASURES:
        values = [r[m] for r in runs if r.get(m) is not None]
        out[m] = {"median": round(statistics.median(values), 2), "max": round(max(values), 2)} if values else None
    out["runs"] = len(runs)
    out["all_ok"] = all(r["ok"] for r in runs)
    out["violations"] = sorted({v for r in runs for v in r["violations"]})
    out["acknowledged_writes_lost"] = sum(r["acknowledged_writes_lost"] for r in runs)
    out["dag_runs_failed"] = sum(r["dag_runs_failed"] for r in runs)
    out["isolated_primary_writes_acknowledged"] = sum(r.get("isolated_primary_writes_acknowledged") or 0 for r in runs)
    out["split_brain"] = any(r.get("split_brain") for r in runs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--hold", type=float, default=15.0)
    ap.add_argument("--lb-reps", type=int, default=5)
    ap.add_argument("--broker-reps", type=int, default=5)
    ap.add_argument("--only", choices=("drills", "lb", "broker"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/lab_drills.json")
    args = ap.parse_args()

    lab = Lab()
    ours = lab.record() is None  # we bring the lab up, so we take it down
    up = json.loads(haflow("lab", "up", "--balancer", "--json").stdout)
    spec = up["spec"]
    balancer = next(h["address"] for h in up["hosts"] if h["role"] == "balancer")
    earlier = json.loads(args.out.read_text()) if args.only and args.out.exists() else {"runs": {}}
    runs = {"drills": args.only in (None, "drills"), "lb": args.only in (None, "lb"), "broker": args.only in (None, "broker")}
    results: dict = {"runs": {n: [] if runs["drills"] else earlier["runs"].get(n, []) for n in SCENARIOS},
                     "lb_runs": [] if runs["lb"] else earlier.get("lb_runs", [])}
    results["runs"][BROKER] = [] if runs["broker"] else earlier["runs"].get(BROKER, [])
    try:
        haflow("deploy", "-f", spec, "--no-smoke")
        for rep in range(args.lb_reps if runs["lb"] else 0):
            print(f"lb check --switchover {rep + 1}/{args.lb_reps}", flush=True)
            results["lb_runs"].append(lb_check(spec, f"{balancer}:5432"))
        for rep in range(args.reps if runs["drills"] else 0):
            for name in SCENARIOS:
                results["runs"][name].append(drill(name, rep, args.reps, args.hold, spec))
        for rep in range(args.broker_reps if runs["broker"] else 0):
            results["runs"][BROKER].append(drill(BROKER, rep, args.broker_reps, args.hold, spec))
    finally:
        if ours:
            haflow("down", "-f", spec, check=False)
            haflow("lab", "down", check=False)
    results["summary"] = {n: summarize(runs) for n, runs in results["runs"].items() if runs}
    if results["lb_runs"]:
        results["summary"]["lb-follow"] = summarize_lb(results["lb_runs"])
    now = utc_now()
    kept = earlier.get("meta", {})
    results["meta"] = {"date": now, "drills_date": now if runs["drills"] else kept.get("drills_date", kept.get("date")),
                       "lb_date": now if runs["lb"] else kept.get("lb_date"),
                       "broker_date": now if runs["broker"] else kept.get("broker_date"),
                       "reps": args.reps if runs["drills"] else kept.get("reps"),
                       "broker_reps": args.broker_reps if runs["broker"] else kept.get("broker_reps"),
                       "hold_s": args.hold, "hosts": 3, "release": (lab.record() or {}).get("release", "trixie")}
    save_results(results, args.out, write_section)


def drill(name: str, rep: int, reps: int, hold: float, spec: str) -> dict:
    print(f"{name} {rep + 1}/{reps}", flush=True)
    r = haflow("drill", name, "--json", "--hold", str(hold), "-f", spec, check=False)
    if not r.stdout.strip().startswith("{"):
        sys.exit(f"drill {name} gave no result ({r.returncode}): {r.stderr[-2000:]}")
    result = json.loads(r.stdout)
    print(f"    ok={result['ok']} rto={result['rto_s']} flow={result['task_flow_gap_s']} healthy={result['recovered_s']} "
          f"refuses={result.get('isolated_primary_refuses_writes_s')} paused={result.get('broker_paused_s')} "
          f"{result['violations']}", flush=True)
    return result


def _loopback() -> dict:
    path = ROOT / "bench/results/drills.json"
    return json.loads(path.read_text())["summary"] if path.exists() else {}


def write_section(r: dict) -> None:
    m = r["meta"]
    loop = _loopback().get("node-crash", {})

    def mm(s: dict | None, k: str) -> str:
        v = (s or {}).get(k)
        return f"{v['median']} / {v['max']} s" if v else "-"

    lines = [
        "## Real network: the lab",
        "",
        f"Measured by `bench/bench_lab_drills.py` (drills last on {m.get('drills_date', m['date'])}): each drill {m['reps']} times, interleaved, on",
        f"{m['hosts']} Debian lab hosts (systemd-nspawn, real network stack and bridge) running the deployed cluster,",
        f"hold {m['hold_s']} s; raw data with every timeline in `bench/results/lab_drills.json`. Loopback: the",
        "node-crash row of the table above (same defaults, every process of the node SIGKILLed on this machine).",
        "",
        "| drill | runs | write RTO median / max | write gap | task-flow gap | majority's primary after | isolated primary refuses writes after | healthy after | lost writes | acknowledged by the isolated primary | split brain | invariants |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in r["summary"].items():
        if name in ("lb-follow", BROKER):
            continue
        lines.append(f"| {name} (lab) | {s['runs']} | {mm(s, 'rto_s')} | {mm(s, 'write_gap_s')} | {mm(s, 'task_flow_gap_s')} | "
                     f"{mm(s, 'majority_primary_s')} | {mm(s, 'isolated_primary_refuses_writes_s')} | {mm(s, 'recovered_s')} | "
                     f"{s['acknowledged_writes_lost']} | "
                     f"{s['isolated_primary_writes_acknowledged'] if name == 'node-partition' else '-'} | "
                     f"{('**yes**' if s['split_brain'] else 'no') if name == 'node-partition' else '-'} | "
                     f"{'all kept' if s['all_ok'] else '**broken**: ' + '; '.join(s['violations'])} |")
    if loop:
        lines.append(f"| node-crash (loopback) | - | {mm(loop, 'rto_s')} | {mm(loop, 'write_gap_s')} | "
                     f"{mm(loop, 'task_flow_gap_s')} | - | - | {mm(loop, 'recovered_s')} | {loop.get('acknowledged_writes_lost')} | - | - | "
                     f"{'all kept' if loop.get('all_ok') else '**broken**'} |")
    br = r["summary"].get(BROKER)
    if br:
        lines += [
            "",
            f"`broker-partition` (measured on {m.get('broker_date') or m['date']}, {br['runs']} runs, hold {m['hold_s']} s): only RabbitMQ's",
            "links (epmd and distribution ports) of the server whose RabbitMQ leads the `default` queue cut, from the other servers.",
            "",
            "| measure | median / max |",
            "|---|---|",
            f"| the other RabbitMQ nodes see it down (`broker_cut_seen_s`) | {mm(br, 'broker_cut_seen_s')} |",
            f"| it paused, pause_minority (`broker_paused_s`) | {mm(br, 'broker_paused_s')} |",
            f"| the queue has a leader on the other side (`queue_leader_moved_s`) | {mm(br, 'queue_leader_moved_s')} |",
            f"| task-flow gap | {mm(br, 'task_flow_gap_s')} |",
            f"| write RTO (PostgreSQL is not cut: expected 0) | {mm(br, 'rto_s')} |",
            f"| healthy after | {mm(br, 'recovered_s')} |",
            f"| lost writes / failed canary runs | {br['acknowledged_writes_lost']} / {br['dag_runs_failed']} |",
            f"| invariants | {'all kept' if br['all_ok'] else '**broken**: ' + '; '.join(br['violations'])} |",
        ]
    lb = r["summary"].get("lb-follow")
    if lb:
        lines += [
            "",
            f"The stand-in cloud balancer (measured on {m.get('lb_date') or m['date']}; HAProxy on its own lab host, configured only from `haflow lb settings`: checks",
            "every 5 s, timeout 2 s, 2 to fall, 2 to rise) following a planned switchover, `haflow lb check --switchover`,",
            f"{lb['runs']} runs: follow (from the new primary's first 200 on `/primary` to connections through the balancer",
            f"reaching it) median / max {mm(lb, 'follow_s')}; the switchover itself {mm(lb, 'switchover_s')}; connections held",
            f"through the balancer closed: {'every run' if lb['old_connections_closed'] else '**not always**'}; "
            f"{'all checks passed' if lb['all_ok'] else '**a check failed**'}.",
        ]
    lines.append("")
    write_docs_section(ROOT / "docs/drills.md", lines)


if __name__ == "__main__":
    main()
