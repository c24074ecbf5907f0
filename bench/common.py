"""What every benchmark script does at its end: write the raw results, render the docs table."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def save_results(results: dict, out: Path, render: Callable[[dict], None]) -> None:
    """Raw JSON to `out`, the table into the docs (`render`), the summary to stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    render(results)
    print(json.dumps(results["summary"], indent=2))
