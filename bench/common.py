"""What every benchmark script does at its end: write the raw results, render the docs table."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import psutil


def utc_now() -> str:
    """When a result was measured, as every results file writes it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def save_results(results: dict, out: Path, render: Callable[[dict], None]) -> None:
    """Raw JSON to `out`, the table into the docs (`render`), the summary to stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    render(results)
    print(json.dumps(results["summary"], indent=2))


def resources(procs: list[psutil.Process], window_s: float) -> dict:
    """What `procs` cost over `window_s`: their PSS and RSS at the end, their CPU time meanwhile."""
    def cpu() -> float:
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    before = cpu()
    time.sleep(window_s)
    after = cpu()
    pss = rss = 0
    for p in procs:
        try:
            m = p.memory_full_info()
            pss += m.pss
            rss += m.rss
        except psutil.Error:
            pass
    return {"processes": len(procs), "pss_mib": round(pss / 2**20), "rss_mib": round(rss / 2**20),
            "idle_cpu_pct_of_one_core": round(100 * (after - before) / window_s, 2), "window_s": window_s}


def write_docs_section(path: Path, lines: list[str]) -> None:
    """Replace the section that starts with lines[0] (a "## " heading) up to the next heading of
    that level, or append it when the document has none yet."""
    text = path.read_text()
    marker = lines[0]
    if marker in text:
        head, _, tail = text.partition(marker)
        rest = tail.split("\n## ", 1)
        after = "\n## " + rest[1] if len(rest) > 1 else ""
        path.write_text(head.rstrip() + "\n\n" + "\n".join(lines) + after)
    else:
        path.write_text(text.rstrip() + "\n\n" + "\n".join(lines))
