"""A state directory knows what it holds: which cluster, which nodes, which secrets.

`haflow up` writes `haflow-state.json` before it writes anything else, and every later command
reads it first. That record is how haflow proves a directory is its own before it rewrites a
config, restarts a process or deletes anything (design.md §7):

- a spec whose cluster name differs from the record's (two specs sharing one `.haflow`, or a
  renamed cluster) is refused, naming both, instead of taking over the other cluster;
- `down --purge` deletes only a directory that carries a record;
- nodes stay recorded after they leave the spec, with their roles and how their server is
  reached, so `down`, `purge` and `haflow node remove` still find them;
- the names of the generated secrets are recorded, so a secrets file that lost some of them is
  told apart from an older one that simply predates a new account;
- how each etcd member met the cluster (founded it, or was added to it, with which member list)
  is recorded, so its etcd file never changes after its first boot.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from haflow.errors import UserError
from haflow.facts import EtcdJoin, hostport
from haflow.fsutil import atomic_write
from haflow.spec import ROLES, WORKER_ONLY, Node, Spec

RECORD_FILE = "haflow-state.json"
FORMAT = 1
NODES_DIR = "nodes"


@dataclass
class Record:
    cluster: str
    nodes: dict[str, str] = field(default_factory=dict)  # every node ever in the cluster -> address
    # per node as last deployed: {"roles": [...], "ssh": {host, user, port, key, known_hosts} | None},
    # key and known_hosts as absolute paths (the spec that named them may be gone)
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)  # ports that cannot change under a running cluster
    secrets: list[str] = field(default_factory=list)  # names of the secrets generated for it
    created: str = ""
    # etcd member -> {"initial_cluster": ..., "state": "new" | "existing"}; a member being added
    # has initial_cluster "" until etcd's member API took it
    etcd: dict[str, dict[str, str]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "cluster": self.cluster, "created": self.created, "nodes": self.nodes,
                           "entries": self.entries, "ports": self.ports, "secrets": sorted(self.secrets),
                           "etcd": self.etcd}, indent=1) + "\n"

    @property
    def running(self) -> bool:
        """The cluster was brought up here once (its secrets exist): its etcd members are set."""
        return bool(self.secrets)


# A member's peer URL is its identity in etcd's membership: changing it needs etcd's member API.
FIXED_PORTS = ("etcd_client", "etcd_peer")


class StateDir:
    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def record_path(self) -> Path:
        return self.path / RECORD_FILE

    def record(self) -> Record | None:
        """The record, None if there is none; a damaged record is an error (never guessed)."""
        try:
            data = json.loads(self.record_path.read_text())
            return Record(cluster=str(data["cluster"]), nodes={str(k): str(v) for k, v in data.get("nodes", {}).items()},
                          entries={str(k): dict(v) for k, v in data.get("entries", {}).items()},
                          ports={str(k): int(v) for k, v in data.get("ports", {}).items()},
                          secrets=[str(s) for s in data.get("secrets", [])], created=str(data.get("created", "")),
                          etcd={str(k): {"initial_cluster": str(v["initial_cluster"]), "state": str(v["state"])}
                                for k, v in data.get("etcd", {}).items()})
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"{self.record_path}: the state record is damaged; restore it from a backup, or recreate it "
                            "by hand as {\"cluster\": \"NAME\"} with the cluster name of its spec") from None

    def has_legacy_data(self) -> bool:
        """A state directory of haflow before records existed: node folders but no record."""
        return self.record() is None and (self.path / NODES_DIR).is_dir()

    def has_cluster_data(self) -> bool:
        rec = self.record()
        return bool(rec and rec.secrets) or (self.path / NODES_DIR).is_dir()

    def generated_secrets(self) -> set[str]:
        """Names of the secrets generated for the cluster here (none without a record)."""
        rec = self.record()
        return set(rec.secrets) if rec else set()

    # --- checks every command makes -----------------------------------------------------------
    def check_owner(self, spec: Spec, source: str) -> None:
        """Refuse a spec for another cluster than the one this directory holds."""
        rec = self.record()
        if rec is not None and rec.cluster != spec.cluster:
            raise UserError(
                f"{self.path} holds cluster {rec.cluster!r}, but {source} describes cluster {spec.cluster!r}; "
                f"give each cluster its own state directory (--state-dir or {spec.cluster}/ next to its spec), "
                "or use the spec of the cluster that lives there"
            )

    def removed_nodes(self, spec: Spec) -> list[str]:
        """Nodes this directory recorded that the spec no longer lists."""
        rec = self.record()
        names = {n.name for n in spec.nodes}
        return sorted(n for n in (rec.nodes if rec else {}) if n not in names)

    def recorded_nodes(self, spec: Spec) -> list[str]:
        """Every node that may have processes or data here: the spec's and the recorded ones."""
        return [n.name for n in spec.nodes] + self.removed_nodes(spec)

    # --- what `up` does first -----------------------------------------------------------------
    def claim(self, spec: Spec, source: str, spec_dir: Path | None = None) -> Record:
        """Record the spec's cluster here (creating the directory), or refuse a change the
        cluster cannot take: another cluster, a node's new address, a new etcd port."""
        self.check_owner(spec, source)
        rec = self.record()
        if rec is None:
            if self.path.exists() and not self.path.is_dir():
                raise UserError(f"{self.path} is not a directory; choose another --state-dir")
            rec = Record(cluster=spec.cluster, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            if not (self.path / NODES_DIR).exists():
                # a new cluster: data, logs and secrets for its owner only. (An older cluster keeps
                # its mode: its database may live inside, reached by the postgres user.)
                self.path.mkdir(parents=True, exist_ok=True)
                self.path.chmod(0o700)
        else:
            problems = self._unchangeable(rec, spec)
            if problems:
                raise UserError(f"{source}: {len(problems)} change(s) an existing cluster cannot take", details=problems)
        self._record_etcd_members(rec, spec)
        rec.nodes.update({n.name: n.address for n in spec.nodes})
        rec.entries.update({n.name: node_entry(n, spec_dir or Path.cwd()) for n in spec.nodes})
        rec.ports = {p: getattr(spec.ports, p) for p in FIXED_PORTS}
        self.save(rec)
        return rec

    @staticmethod
    def _record_etcd_members(rec: Record, spec: Spec) -> None:
        """Founders (every member of a cluster not yet brought up, or of a record older than this
        bookkeeping) start with the spec's member list; a member new to a running cluster is
        marked to be added through etcd's member API (`etcd_added`), one after the other."""
        if not rec.running or not rec.etcd:
            founders = [n for n in spec.etcd_members if not rec.running or n.name in rec.nodes]
            initial = _initial_cluster(founders, spec)
            rec.etcd = {n.name: {"initial_cluster": initial, "state": "new"} for n in founders}
        for n in spec.etcd_members:
            rec.etcd.setdefault(n.name, {"initial_cluster": "", "state": "existing"})

    @staticmethod
    def _etcd_changes(rec: Record, spec: Spec) -> list[str]:
        if not rec.running:
            return []
        problems = []
        members = {n.name for n in spec.etcd_members}
        staying = {n.name for n in spec.nodes}
        for m in sorted(set(rec.etcd) - members):
            if m in staying:
                problems.append(f"etcd.members: {m} is an etcd member of the running cluster; removing an etcd member "
                                f"from a node that stays is not supported: put {m} back in etcd.members")
        return problems

    @staticmethod
    def _unchangeable(rec: Record, spec: Spec) -> list[str]:
        problems = StateDir._etcd_changes(rec, spec)
        for i, n in enumerate(spec.nodes):
            old = rec.nodes.get(n.name)
            # a record older than roles knew full nodes only
            old_roles = set(rec.entries.get(n.name, {}).get("roles") or ROLES) if old is not None else None
            if old_roles is not None and old_roles != set(n.roles):
                problems.append(
                    f"nodes[{i}].roles: {n.name} was created as a {_kind(old_roles)} node; a node cannot change what "
                    f"it runs: put back its roles, or remove it and add a new node")
            if old is not None and old != n.address:
                problems.append(
                    f"nodes[{i}].address: {n.name} was created at {old}; a node's address is part of its etcd peer URL "
                    "and RabbitMQ node name, so it cannot change: put back "
                    f"{old}, or remove the node (`haflow down`, then drop it) and add a new one")
        for p in FIXED_PORTS:
            old_port = rec.ports.get(p)
            if old_port is not None and old_port != getattr(spec.ports, p):
                problems.append(
                    f"ports.{p}: the cluster's etcd members were created on {old_port}; etcd keeps members by "
                    f"their URLs, so a new {p} would split the cluster: put back {old_port}")
        return problems

    # --- etcd membership -------------------------------------------------------------------------
    def etcd_joins(self, spec: Spec) -> dict[str, EtcdJoin]:
        """How each recorded etcd member meets the cluster on its first boot (for ClusterFacts).
        A member still being added gets the list it will have: the spec's members."""
        rec = self.record()
        if rec is None or not rec.etcd:
            return {}
        planned = _initial_cluster(spec.etcd_members, spec)
        return {m: EtcdJoin(v["initial_cluster"] or planned, v["state"]) for m, v in rec.etcd.items()}

    def etcd_to_add(self) -> list[str]:
        """Members marked to be added that etcd's member API has not taken yet."""
        rec = self.record()
        return [m for m, v in (rec.etcd if rec else {}).items() if not v["initial_cluster"]]

    def etcd_added(self, name: str, initial_cluster: str) -> None:
        """etcd took `name` as a member; `initial_cluster` is the member list it boots with."""
        rec = self.record()
        if rec is not None:
            rec.etcd[name] = {"initial_cluster": initial_cluster, "state": "existing"}
            self.save(rec)

    def forget(self, name: str) -> None:
        """A node removed for good (`haflow node remove`): no longer part of the cluster."""
        rec = self.record()
        if rec is not None and name in rec.nodes:
            rec.nodes.pop(name)
            rec.entries.pop(name, None)
            rec.etcd.pop(name, None)
            self.save(rec)

    def save(self, rec: Record) -> None:
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(self.record_path, rec.to_json(), 0o600)

    def record_secrets(self, names: list[str]) -> None:
        rec = self.record()
        if rec is not None and sorted(rec.secrets) != sorted(names):
            rec.secrets = sorted(names)
            self.save(rec)

    # --- what purge demands -------------------------------------------------------------------
    def check_purgeable(self, spec: Spec, source: str) -> None:
        """Only a directory that carries haflow's record, for this very cluster, is deleted."""
        if not self.path.exists():
            return
        if self.record() is None:
            raise UserError(
                f"{self.path} is not a haflow state directory (it has no {RECORD_FILE}); refusing to delete it. "
                "Check --state-dir and HAFLOW_STATE_DIR; a state directory of an older haflow gets its record "
                "from one `haflow up`")
        self.check_owner(spec, source)



def _initial_cluster(members: list[Node], spec: Spec) -> str:
    """etcd's initial-cluster for these members: NAME=PEER_URL, comma-separated."""
    return ",".join(f"{n.name}=http://{hostport(n.address, spec.ports.etcd_peer)}" for n in members)


def _kind(roles: set[str]) -> str:
    return "worker-only" if roles == set(WORKER_ONLY) else "full"


def node_entry(node: Node, spec_dir: Path) -> dict[str, Any]:
    """What the record keeps of a node: its roles and how its server is reached."""
    ssh = None
    if node.ssh is not None:
        def absolute(p: str | None) -> str | None:
            return str((spec_dir / p).expanduser().resolve()) if p else None
        ssh = {"host": node.ssh.host or node.address, "user": node.ssh.user, "port": node.ssh.port,
               "key": absolute(node.ssh.key), "known_hosts": absolute(node.ssh.known_hosts)}
    return {"roles": list(node.roles), "ssh": ssh}
