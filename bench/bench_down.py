"""How long `haflow down` takes on a healthy local cluster, stage by stage.

Each run brings the embedded default cluster up (`up --no-smoke`), lets it settle, then times
`haflow down` from this machine and reads the stage offsets from its progress lines. Runs are
appended to bench/results/down.json under a label (every earlier run is kept), and the section
"Stopping the cluster" of docs/benchmarks.md is rewritten from all of them.

--src runs another checkout's haflow (its `src` on PYTHONPATH, this venv's Python, its own
directory as the working directory and so its own state directory): the way to measure the
code before a change beside the code after it.

    .venv/bin/python bench/bench_down.py --label after [--runs 3] [--settle 30] [--src DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import write_docs_section

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench/results/down.json"
STAGE = re.compile(r"^\s*([\d.]+)s (stopping .*)$")


def haflow(src: Path | None, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    cwd = ROOT
    if src:
        env["PYTHONPATH"] = str(src / "src")
        cwd = src
    return subprocess.run([sys.executable, "-m", "haflow.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def stages(progress: str) -> list[dict]:
    """The stage lines of `down`'s progress ("  3.9s stopping api-servers"); a line the
    terminal width wrapped is joined back."""
    out: list[dict] = []
    for line in progress.splitlines():
        m = STAGE.match(line)
        if m:
            out.append({"at_s": float(m.group(1)), "stage": m.group(2).strip()})
        elif out and line.strip() and not line.startswith("cluster "):
            out[-1]["stage"] += " " + line.strip()
    return out


def one_run(src: Path | None, settle: float) -> dict:
    r = haflow(src, "up", "--no-smoke")
    if r.returncode != 0:
        raise SystemExit(f"up failed: {r.stderr[-2000:]}")
    time.sleep(settle)
    t0 = time.monotonic()
    r = haflow(src, "down")
    elapsed = round(time.monotonic() - t0, 2)
    if r.returncode != 0:
        raise SystemExit(f"down failed: {r.stderr[-2000:]}")
    return {"elapsed_s": elapsed, "stages": stages(r.stderr)}


def commit(src: Path | None) -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=src or ROOT, capture_output=True, text=True)
    return r.stdout.strip()


def render(results: dict) -> None:
    lines = [
        "## Stopping the cluster (`haflow down`)",
        "",
        "Measured by `bench/bench_down.py`: the embedded default cluster brought up (`up --no-smoke`), left "
        "to settle, then `haflow down` timed from this machine (the command's whole run, Python's start "
        "included). Every run is kept in `bench/results/down.json`; the stage offsets of each are there too.",
        "",
        "| label | commit | runs | median | min | max | every run |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        t = run["elapsed_s"]
        lines.append(f"| `{run['label']}` | {run['commit']} | {len(t)} | {statistics.median(t):.1f} s | {min(t):.1f} s | "
                     f"{max(t):.1f} s | {', '.join(f'{x:.1f}' for x in t)} |")
    lines += [
        "",
        "Where the time went before (stage offsets in the results; single stops measured by hand on "
        "the same cluster):",
        "",
        "- Patroni replicas waited 10-12 s each for the primary to release them from synchronous standby "
        "(Patroni polls every 2 s until the primary's next HA cycle, up to 2 x loop_wait). `down` now wakes "
        "the leader up (a PATCH of /config that changes nothing) while they stop: about 2 s.",
        "- Every Airflow process spent 1-2.5 s of CPU in the interpreter's final garbage collection after its "
        "own shutdown had finished (api-server: 2.3-2.5 s alone, 5-7 s with three at once on 2 cores); "
        "`data/sitecustomize.py` skips it (0.20-0.24 s).",
        "- RabbitMQ (about 6 s) now stops beside the database chain, and the schedulers, triggerers and "
        "dag-processors with the workers.",
        "- A triggerer sometimes needed 10 s. On SIGTERM Airflow's triggerer sends its trigger-runner "
        "process SIGINT and waits for it with `kill(escalation_delay=10)`, which reads the runner's sockets "
        "until it exits. When the runner's sockets already closed in the triggerer's last loop, that wait "
        "was a `select()` on no socket at all: it slept the whole 10 s and only then found the runner "
        "long gone (the log: `Process exited ... signal_sent=SIGINT` exactly 10 s after `Waiting for "
        "triggers to clean up`; `_service_subprocess` in `sdk/execution_time/supervisor.py`). It hit 2 of "
        "the 3 `after` runs. `data/haflow_airflow.py` now waits on the process itself once no socket is "
        "left (`after-supervisor-fix`); `tests/integration/test_airflow_supervisor_fix.py` shows the wait "
        "on the real Airflow: 6.0 s without the fix, 0.0 s with it.",
        "- What is left (`after-supervisor-fix`, stage offsets): the Celery workers' warm shutdown about "
        "3.5 s (the first stage), then Patroni 8.2-9.4 s. Patroni's own shutdown has fixed waits haflow "
        "does not control: a replica polls every 2 s to be released from synchronous standby, "
        "PostgreSQL's stop is polled at 1 s (`STOP_POLLING_INTERVAL`), the REST API's server loop at "
        "0.5 s, and the leader sleeps 1 s after its shutdown checkpoint \"to give replicas some more time "
        "to catch up\". Measured by hand: replicas 4.1 s, then the leader 2.5 s, with nothing else running.",
        "",
    ]
    write_docs_section(ROOT / "docs/benchmarks.md", lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--settle", type=float, default=30, help="seconds between up and down")
    ap.add_argument("--src", type=Path, default=None, help="another checkout to run instead of this one")
    args = ap.parse_args()
    results = json.loads(OUT.read_text()) if OUT.exists() else {"runs": []}
    runs = []
    for i in range(args.runs):
        runs.append(one_run(args.src, args.settle))
        print(f"run {i + 1}/{args.runs}: down took {runs[-1]['elapsed_s']} s", flush=True)
    results["runs"].append({"label": args.label, "commit": commit(args.src), "at": time.strftime("%Y-%m-%d %H:%M"),
                            "settle_s": args.settle, "elapsed_s": [r["elapsed_s"] for r in runs],
                            "stages": [r["stages"] for r in runs]})
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    render(results)


if __name__ == "__main__":
    main()
