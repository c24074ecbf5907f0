"""The seam between components and hosts: a node's desired state.

A component says *what* a node needs (files with owner and mode, directories, services with
argv, env and user); a host makes it so and reports what changed. Components never know
whether they run locally or over SSH; hosts never know what a component is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


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
class Service:
    name: str  # unique on the node, e.g. "etcd"
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    cwd: Path | None = None
    stop_signal: str = "TERM"
    stop_timeout_s: int = 30
    restart_files: tuple[Path, ...] = ()  # a change to one of these restarts the service


@dataclass
class DesiredState:
    dirs: list[Directory] = field(default_factory=list)
    files: list[File] = field(default_factory=list)
    services: list[Service] = field(default_factory=list)

    def extend(self, other: "DesiredState") -> None:
        self.dirs += other.dirs
        self.files += other.files
        self.services += other.services
