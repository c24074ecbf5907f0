"""The host contract: where a cluster's files go and its processes run.

Orchestration (`cluster.py`), status and drills speak to a host only through these verbs; they
never see a PID, a supervisor or a unit file. Two implementations: `LocalHost` (every node on
this machine, a supervisord per node; hosts/local.py) and, next, an SSH host (systemd units on
real servers). `haflow.hosts.for_spec` chooses one from the spec.

A *node* is a member of the cluster (an address, its services). A *machine* is what nodes run
on: locally one machine carries every node; over SSH each host is its own machine. Things that
exist once per machine (epmd, runtime venvs, distro packages, system users) are asked of a
machine; a verb's `target` is a node name or a `Machine`.

Verbs, most critical first (the ones a drill or a restart depends on):

- ``layout(node)``, ``machine_layout(machine)``: where files live, as whom services run.
- ``machines()``: the machines and the nodes each carries.
- ``preflight(target, listen)``: why the target cannot run here (address absent, port taken).
- ``missing(machine, needs)`` / ``provision(machine, needs, say)``: distro packages, runtime
  venvs and system users a component declared (components/base.py `Needs`).
- ``plan(target, desired)`` -> changes, ``apply(target, desired)`` -> files changed: make files,
  folders and service definitions as desired (a dry run is `plan`; a re-run changes nothing).
- ``boot(target)``: the target's init runs (the node's supervisor; systemd is always up).
- ``start / stop / restart / reload(target, service)``: a service's state; `stop` also stops a
  daemon the service forked (``Service.forks``) that it left behind.
- ``instance(target, service)``: the running instance's identity (PID + start time here,
  systemd's InvocationID on a real host), None when not running; a restart changes it.
- ``stale(target)``: running services whose definition changed since they started.
- ``changed_since_start(target, service, paths)``: a file written after the service started.
- ``run(node, argv, env, ...)``: a one-shot command on the node, (exit code, output).
- ``put_tree(node, source, checksum, dest, owner)`` / ``tree_checksum(node, dest)``: an exact copy of a
  folder, switched atomically, and the checksum of what a node has.
- ``kill_service(node, service)`` -> instances killed: a crash (SIGKILL), the init restarts it.
- ``kill_node(node)`` -> processes killed: a power cut; the node stays down until ``boot``.
- ``running(target)``: whether the target's init runs (a killed node: False).
- ``stop_node(target)``: stop everything of it; ``leftovers(target, timeout)`` proves nothing
  is left (waiting up to `timeout` for what is still going).
- ``purge()``: remove what this host created for the cluster, nothing else.
- ``recovery_hint()``: where a failed step's logs are and which command re-runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Union, runtime_checkable

from haflow.components.base import DesiredState, Needs
from haflow.facts import NodeLayout

Say = Callable[[str], None]

# The system user each component's services run as when haflow runs as root (the packages
# create all but `airflow` and `airflow-worker`, which provisioning creates).
SERVICE_USERS = {"etcd": "etcd", "haproxy": "haproxy", "pgbouncer": "pgbouncer", "rabbitmq": "rabbitmq", "airflow": "airflow",
                 "airflow-worker": "airflow-worker"}


@dataclass(frozen=True)
class Machine:
    """What nodes run on: one per real host; one for every node on the local machine."""

    name: str
    nodes: tuple[str, ...]


Target = Union[str, Machine]  # a node name, or a machine for machine-wide services


@dataclass(frozen=True)
class Instance:
    """One run of a service: a restart (by its init or by haflow) gives a new identity."""

    target: str
    service: str
    id: str  # "PID@start-time" locally, systemd's InvocationID on a real host


@dataclass(frozen=True)
class Change:
    """One thing `apply` would change: a file's content, mode or owner, a folder, a definition."""

    target: str
    path: Path
    what: str  # "create", "update", "mode", "owner"
    diff: str | None = None  # a unified diff of a file's content, when asked for (secrets masked)
    service: str | None = None  # the service this file defines (its unit, its environment), if any


@runtime_checkable
class Host(Protocol):
    kind: str  # "local", "ssh"

    def recovery_hint(self) -> str: ...  # where to look and what to re-run when a step fails
    def layout(self, node: str) -> NodeLayout: ...
    def machine_layout(self, machine: Machine) -> NodeLayout: ...
    def machines(self) -> list[Machine]: ...
    def preflight(self, target: Target, listen: dict[tuple[str, int], str]) -> list[str]: ...
    def missing(self, machine: Machine, needs: Needs) -> list[str]: ...
    def provision(self, machine: Machine, needs: Needs, say: Say) -> list[str]: ...
    def plan(self, target: Target, desired: DesiredState, diff: bool = False) -> list[Change]: ...
    def apply(self, target: Target, desired: DesiredState) -> list[Path]: ...
    def boot(self, target: Target) -> bool: ...
    def start(self, target: Target, service: str) -> bool: ...
    def stop(self, target: Target, service: str) -> None: ...
    def restart(self, target: Target, service: str) -> None: ...
    def reload(self, target: Target, service: str) -> bool: ...
    def instance(self, target: Target, service: str) -> Instance | None: ...
    def stale(self, target: Target) -> list[str]: ...
    def changed_since_start(self, target: Target, service: str, paths: tuple[Path, ...]) -> bool: ...
    def run(self, node: str, argv: list[str], env: dict[str, str], timeout: float = 600,
            user: str | None = None, cwd: Path | None = None) -> tuple[int, str]: ...
    def put_tree(self, node: str, source: Path, checksum: str, dest: Path, owner: str | None = None) -> bool: ...
    def tree_checksum(self, node: str, dest: Path) -> str | None: ...
    def kill_service(self, node: str, service: str) -> list[Instance]: ...
    def kill_node(self, target: Target) -> int: ...
    def running(self, target: Target) -> bool: ...
    def stop_node(self, target: Target) -> None: ...
    def leftovers(self, target: Target, timeout: float = 10.0) -> list[str]: ...
    def purge_node(self, node: str) -> None: ...  # one node's files (it left the cluster)
    def purge(self) -> None: ...
