"""The component contract: what a component says about a node, for any host to carry out.

Every component module (etcd, patroni, haproxy, rabbitmq, airflow; listed once in
`haflow.components.REGISTRY`) offers:

- ``NAME`` and ``render(facts, node, layout, secrets) -> DesiredState``: the files (owner, mode),
  directories and services (argv, env, user, and any daemon a service forks that must die with
  it) one node needs;
- ``runs_on(node) -> bool``: whether the node runs any of it (by its roles): a machine is
  provisioned only with the ``needs`` of what its nodes run;
- ``needs(facts, layout) -> Needs``: what must be installed on a machine first (distro packages,
  runtime venvs, system users);
- ``probe(...)``: the layer's health, read over the network from the control machine.

A host makes the desired state so and reports what changed. Components never know whether they
run locally or over SSH; hosts never know what a component is: they see files, folders,
services and packages only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class File:
    path: Path
    content: str
    mode: int = 0o644
    owner: str | None = None  # None: the user haflow runs as


@dataclass(frozen=True)
class Directory:
    path: Path
    mode: int = 0o755
    owner: str | None = None
    # shared with the owner's group: when the folder's mode changes (a cluster made by an
    # older haflow), what is already inside becomes group-writable too
    group_tree: bool = False


@dataclass(frozen=True)
class Forks:
    """A daemon a service starts that outlives it unless stopped too (Patroni double-forks
    PostgreSQL's postmaster): found by its pid file, recognised by `marker` in its command line,
    stopped with `stop_signal` when the service has stopped and left it behind."""

    pidfile: Path
    marker: str
    stop_signal: str = "INT"  # PostgreSQL: SIGINT is the fast shutdown


@dataclass(frozen=True)
class Service:
    name: str  # unique on the node, e.g. "etcd"
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    cwd: Path | None = None
    stop_signal: str = "TERM"
    stop_timeout_s: int = 30
    reload_signal: str | None = None  # takes a changed config without a restart (None: restart)
    restart_files: tuple[Path, ...] = ()  # a change to one of these restarts the service
    forks: Forks | None = None
    after: tuple[str, ...] = ()  # services of the same node or machine that start first (systemd's After=)


@dataclass
class DesiredState:
    dirs: list[Directory] = field(default_factory=list)
    files: list[File] = field(default_factory=list)
    services: list[Service] = field(default_factory=list)

    def extend(self, other: "DesiredState") -> None:
        self.dirs += other.dirs
        self.files += other.files
        self.services += other.services


@dataclass(frozen=True)
class Package:
    """A distro package, present when every one of its commands and paths exists."""

    apt: str
    what: str
    commands: tuple[str, ...] = ()
    paths: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Venv:
    """A runtime virtualenv with exactly these requirements, reachable by `user`."""

    path: Path
    requirements: tuple[str, ...]
    user: str | None = None  # None: the user haflow runs as


@dataclass(frozen=True)
class Needs:
    """What a machine must have before a component's services can start there."""

    packages: tuple[Package, ...] = ()
    venvs: tuple[Venv, ...] = ()
    users: tuple[str, ...] = ()  # system users to create when missing (the packages create theirs)

    def __add__(self, other: "Needs") -> "Needs":
        def merge(a: tuple, b: tuple) -> tuple:
            return a + tuple(x for x in b if x not in a)
        return Needs(merge(self.packages, other.packages), merge(self.venvs, other.venvs), merge(self.users, other.users))


@dataclass(frozen=True)
class LayerStatus:
    """What a layer's probe returns: an immutable snapshot. Each component extends it with its
    own fields; `to_json` renders it to its part of `status --json` (docs/status.md)."""

    healthy: bool
    problems: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def unhealthy_nodes(self) -> list[str]:
        """The members that report themselves unhealthy (for a gate's error message)."""
        return [m.node for m in getattr(self, "members", ()) if not getattr(m, "healthy", True)]


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def data_text(name: str) -> str:
    """A file haflow ships in haflow/data (a script or module a component installs on a node)."""
    return resources.files("haflow").joinpath("data", name).read_text()
