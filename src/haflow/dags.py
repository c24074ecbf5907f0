"""DAG distribution: the same DAG folder on every node, switched atomically, checked by checksum.

The folder is the spec's `airflow.dags` (relative to the spec file) or haflow's shipped examples;
haflow adds its canary DAG (used by `haflow drill`) unless the folder has one. Each node gets an
exact copy through the host's `put_tree` (Airflow reads a link that flips from one complete
copy to the next) and reports what it has through `tree_checksum`.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

from haflow.components import airflow
from haflow.errors import HaflowError, UserError
from haflow.fsutil import tree_checksum
from haflow.hosts.base import Host
from haflow.spec import Spec, check_paths, dags_folder

CANARY_DAG_FILE = "haflow_canary.py"
STAGED = "dags-staged"


def examples_dir() -> Path:
    """The shipped example DAGs (the one copy in the repository)."""
    return Path(str(resources.files("haflow").joinpath("examples", "dags")))


def canary_dag_source() -> Path:
    return examples_dir() / CANARY_DAG_FILE


def extras(folder: Path) -> dict[str, Path]:
    """What haflow adds to a DAG folder: its canary DAG, unless present."""
    return {} if (folder / CANARY_DAG_FILE).exists() else {CANARY_DAG_FILE: canary_dag_source()}


UNREACHABLE = object()  # a node whose server did not answer

class Dags:
    def __init__(self, spec: Spec, spec_dir: Path, state_dir: Path, host: Host) -> None:
        self.spec = spec
        self.spec_dir = spec_dir
        self.state_dir = state_dir
        self.host = host

    def source(self) -> Path:
        """The spec's DAG folder, or the shipped examples."""
        folder = dags_folder(self.spec, self.spec_dir)
        if folder is None:
            return examples_dir()
        check_paths(self.spec, self.spec_dir, self.state_dir)  # it may have moved since the spec was loaded
        return folder

    def bundle(self) -> Path:
        """What every node gets: the folder plus haflow's additions, staged in the state
        directory when there are any."""
        source = self.source()
        added = extras(source)
        if not added:
            return source
        staged = self.state_dir / STAGED
        tmp = self.state_dir / f".{STAGED}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for name, path in added.items():
            shutil.copy2(path, tmp / name)
        shutil.rmtree(staged, ignore_errors=True)
        tmp.rename(staged)
        return staged

    def _dest(self, node: str) -> tuple[Path, str | None]:
        layout = self.host.layout(node)
        return airflow.dags_dir(layout), layout.user(airflow.NAME)

    def push(self) -> list[str]:
        """Copy the bundle to every node; returns what changed (nothing when every node has it)."""
        bundle = self.bundle()
        checksum = tree_checksum(bundle)  # once, for every node
        done = []
        for node in (n.name for n in self.spec.nodes):
            dest, owner = self._dest(node)
            if self.host.put_tree(node, bundle, checksum, dest, owner):
                done.append(f"{node}: DAGs {checksum[:12]}")
        return done

    def status(self) -> dict[str, Any]:
        """The source's checksum and each node's; `agree`: every node has the same DAGs,
        `current`: they are the source's."""
        try:
            source: Path | None = self.source()
            want = tree_checksum(source, extras(source))
        except UserError:
            source, want = None, None
        names = [n.name for n in self.spec.nodes]
        with ThreadPoolExecutor(max_workers=len(names)) as pool:  # a cut-off server must not hold up the rest
            found = dict(zip(names, pool.map(self._checksum, names)))
        nodes = [{"node": n, "checksum": found[n]} for n in names if found[n] is not UNREACHABLE]
        unreachable = [n for n in names if found[n] is UNREACHABLE]
        sums = {n["checksum"] for n in nodes}
        return {"source": str(source) if source else None, "source_checksum": want, "nodes": nodes,
                "unreachable": unreachable,
                "agree": len(sums) == 1 and None not in sums, "current": sums == {want}}

    def _checksum(self, node: str) -> str | None | object:
        """The node's DAG folder checksum; UNREACHABLE when its server does not answer (a down
        or cut-off server is reported, not an error of the whole status)."""
        try:
            return self.host.tree_checksum(node, self._dest(node)[0])
        except HaflowError:
            return UNREACHABLE
