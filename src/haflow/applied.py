"""What configuration each running service took, kept per node in the state directory.

A service keeps running on the configuration it started with until orchestration restarts it.
`up` writes new files first and restarts later, one node at a time: an `up` that failed in
between must still restart the service on the next run, although no file changes then. So
every start, reload or restart records a digest of the service's restart files, and a service
whose record differs from the files now is stale. A cluster started by an older haflow has no
record: then a restart file written in this run, or after the service started, makes it stale.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from haflow.components.base import DesiredState, Service
from haflow.fsutil import atomic_write
from haflow.hosts.base import Host

APPLIED_FILE = "applied-config.json"


def digest(parts: list[str]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


class AppliedConfigs:
    def __init__(self, state_dir: Path, host: Host) -> None:
        self.state_dir = state_dir
        self.host = host
        self._wanted: dict[str, dict[str, str]] = {}  # per node: service -> digest of its restart files now
        self._services: dict[str, dict[str, Service]] = {}
        self._records: dict[str, dict[str, str]] = {}  # per node: the file's content, read once

    def _file(self, node: str) -> Path:
        # on the control machine, whatever the host: the state directory is haflow's own
        return self.state_dir / "nodes" / node / APPLIED_FILE

    def expect(self, node: str, desired: DesiredState) -> None:
        """What the node's services must run on, from the desired state just applied."""
        contents = {f.path: f.content for f in desired.files}
        self._services[node] = {s.name: s for s in desired.services}
        self._wanted[node] = {s.name: digest([contents.get(p, "") for p in s.restart_files]) for s in desired.services}

    def _record(self, node: str) -> dict[str, str]:
        if node not in self._records:
            try:
                data = json.loads(self._file(node).read_text())
                self._records[node] = data if isinstance(data, dict) else {}
            except (OSError, ValueError):
                self._records[node] = {}
        return self._records[node]

    def took(self, node: str, service: str) -> None:
        """The service (re)started or reloaded on its current configuration."""
        record = self._record(node)
        record[service] = self._wanted[node][service]
        atomic_write(self._file(node), json.dumps(record, indent=1, sort_keys=True), 0o600)

    def stale(self, node: str, service: str, changed_files: list[Path]) -> bool:
        """The running service took another configuration than the one written now."""
        took = self._record(node).get(service)
        if took is not None:
            return took != self._wanted[node][service]
        spec = self._services[node][service]
        return (any(p in spec.restart_files for p in changed_files)
                or self.host.changed_since_start(node, service, spec.restart_files))

    def forget(self, node: str) -> None:
        """A node removed from the cluster: its record goes (and its folder, when empty)."""
        self._records.pop(node, None)
        self._file(node).unlink(missing_ok=True)
        try:
            self._file(node).parent.rmdir()
        except OSError:
            pass  # gone already, or it holds more of the node (a local node's files)
