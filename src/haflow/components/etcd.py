"""etcd: the DCS. One member per node listed in `etcd.members`, v3 API only."""

from __future__ import annotations

import shutil
from typing import Any

import httpx
import yaml

from haflow.components.base import DesiredState, Directory, File, Service
from haflow.facts import ClusterFacts, NodeFacts, NodeLayout

NAME = "etcd"
BINARY = "etcd"
MIN_CLUSTER_VERSION = (3, 4)  # Debian 12 ships 3.4; Patroni needs >= 3.1 for watches
# Every Patroni loop writes its member key and the leader key, each write a new revision: with
# no compaction the database grows until etcd raises NOSPACE and refuses writes, and Patroni can
# no longer hold its leader key. Revisions older than COMPACTION_RETENTION are dropped; the
# quota is far above what a compacted cluster uses (a few MiB) and far below the disk.
COMPACTION_RETENTION = "10m"
QUOTA_BYTES = 1024**3


def config(facts: ClusterFacts, node: NodeFacts, layout: NodeLayout) -> dict[str, Any]:
    # Restarting a member with an existing data dir ignores the initial-* keys, so the same
    # file serves the first boot and every restart.
    return {
        "name": node.name,
        "data-dir": str(layout.etcd_data),
        "listen-client-urls": node.etcd_client_url,
        "advertise-client-urls": node.etcd_client_url,
        "listen-peer-urls": node.etcd_peer_url,
        "initial-advertise-peer-urls": node.etcd_peer_url,
        "initial-cluster": facts.etcd_initial_cluster,
        "initial-cluster-token": facts.etcd_token,
        "initial-cluster-state": "new",
        "enable-v2": False,
        # Patroni's etcd3 client and our probes use the JSON gateway under /v3. The flag
        # defaults to on, but a config file leaves every unlisted bool off.
        "enable-grpc-gateway": True,
        "auto-compaction-mode": "periodic",
        "auto-compaction-retention": COMPACTION_RETENTION,
        "quota-backend-bytes": QUOTA_BYTES,
        "logger": "zap",
        "log-outputs": ["stderr"],
        "log-level": "warn",
    }


def render(facts: ClusterFacts, node: NodeFacts, layout: NodeLayout) -> DesiredState:
    if not node.is_etcd_member:
        return DesiredState()
    conf = layout.root / "etcd.yaml"
    return DesiredState(
        dirs=[Directory(layout.etcd_data, 0o700)],
        files=[File(conf, yaml.safe_dump(config(facts, node, layout), sort_keys=False), 0o644)],
        services=[
            Service(
                name=NAME,
                argv=(shutil.which(BINARY) or f"/usr/bin/{BINARY}", "--config-file", str(conf)),
                stop_timeout_s=20,
                restart_files=(conf,),
            )
        ],
    )


# --- probes -----------------------------------------------------------------------------------


def member_health(node: NodeFacts, timeout: float = 2.0) -> bool:
    try:
        r = httpx.get(f"{node.etcd_client_url}/health", timeout=timeout)
        return r.status_code == 200 and r.json().get("health") == "true"
    except (httpx.HTTPError, ValueError):
        return False


def _post(node: NodeFacts, path: str, timeout: float) -> dict[str, Any] | None:
    return _post_body(node, path, {}, timeout)


def leader_name(facts: ClusterFacts, timeout: float = 2.0) -> str | None:
    """The member the raft leader is, asked of the first member that answers."""
    for node in facts.etcd_members:
        status = _post(node, "/v3/maintenance/status", timeout)
        members = _post(node, "/v3/cluster/member/list", timeout)
        if not status or not members or "leader" not in status:
            continue
        for m in members.get("members", []):
            if m.get("ID") == status["leader"]:
                return m.get("name")
    return None


def cluster_version(facts: ClusterFacts, timeout: float = 2.0) -> str | None:
    """The version the members agreed to run at ("etcdcluster" of GET /version).

    A fresh cluster reports 3.0.0 for its first moments; a Patroni that starts then falls back to
    the v3alpha API without watches, which slows every later failover by up to loop_wait."""
    for node in facts.etcd_members:
        try:
            v = httpx.get(f"{node.etcd_client_url}/version", timeout=timeout).json().get("etcdcluster")
            if v and v != "not_decided":
                return v
        except (httpx.HTTPError, ValueError):
            continue
    return None


def _version_tuple(v: str | None) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in (v or "").split(".")[:2])
    except ValueError:
        return ()


def alarms(facts: ClusterFacts, names: dict[str, str], timeout: float = 2.0) -> list[str] | None:
    """Raised alarms as "NODE: NOSPACE" lines (asked of the first member that answers);
    `names` maps member ids to node names."""
    for node in facts.etcd_members:
        got = _post_body(node, "/v3/maintenance/alarm", {"action": "GET"}, timeout)
        if got is not None:
            return [f"{names.get(a.get('memberID'), a.get('memberID'))}: {a.get('alarm')}" for a in got.get("alarms") or []]
    return None


def probe(facts: ClusterFacts) -> dict[str, Any]:
    """Layer status: `{"healthy", "leader", "cluster_version", "quota_bytes", "alarms",
    "members": [{"node", "healthy", "db_size_bytes"}]}`."""
    members, names = [], {}
    for n in facts.etcd_members:
        status = _post(n, "/v3/maintenance/status", 2.0) or {}
        names[status.get("header", {}).get("member_id")] = n.name
        size = status.get("dbSize")
        members.append({"node": n.name, "healthy": member_health(n), "db_size_bytes": int(size) if size else None})
    leader = leader_name(facts)
    version = cluster_version(facts)
    raised = alarms(facts, names) or []
    problems = [f"etcd alarm {a} (NOSPACE: compact and defragment, then `etcdctl alarm disarm`)" for a in raised]
    big = [m["node"] for m in members if m["db_size_bytes"] and m["db_size_bytes"] > QUOTA_BYTES * 0.8]
    if big:
        problems.append(f"etcd database above 80 % of its {QUOTA_BYTES} byte quota on {', '.join(big)}")
    if leader is None:
        problems.append("no etcd leader (quorum lost?)")
    bad = [m["node"] for m in members if not m["healthy"]]
    if bad:
        problems.append(f"etcd member(s) not healthy: {', '.join(bad)}")
    if _version_tuple(version) < MIN_CLUSTER_VERSION:
        problems.append(f"etcd cluster version {version or 'undecided'} (waiting for >= 3.4)")
    return {"healthy": not problems, "leader": leader, "cluster_version": version, "quota_bytes": QUOTA_BYTES,
            "alarms": raised, "members": members, "problems": problems}


def move_leader_away(facts: ClusterFacts, avoid: str, timeout: float = 3.0) -> str | None:
    """If node `avoid` holds etcd's raft leadership, hand it to another healthy member.
    Returns the member that became leader, or None if nothing was moved."""
    if leader_name(facts, timeout) != avoid:
        return None
    source = next((n for n in facts.etcd_members if n.name == avoid), None)
    if source is None:
        return None
    for peer in facts.etcd_members:
        if peer.name == avoid or not member_health(peer):
            continue
        status = _post(peer, "/v3/maintenance/status", timeout)
        target = (status or {}).get("header", {}).get("member_id")
        if target and _post_body(source, "/v3/maintenance/transfer-leadership", {"targetID": target}, timeout) is not None:
            return peer.name
    return None


def _post_body(node: NodeFacts, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any] | None:
    try:
        r = httpx.post(f"{node.etcd_client_url}{path}", json=body, timeout=timeout)
        return r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
