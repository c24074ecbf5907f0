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
    try:
        r = httpx.post(f"{node.etcd_client_url}{path}", json={}, timeout=timeout)
        return r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


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


def probe(facts: ClusterFacts) -> dict[str, Any]:
    """Layer status: `{"healthy", "leader", "members": [{"node", "healthy"}]}`."""
    members = [{"node": n.name, "healthy": member_health(n)} for n in facts.etcd_members]
    leader = leader_name(facts)
    healthy = leader is not None and all(m["healthy"] for m in members)
    return {"healthy": healthy, "leader": leader, "members": members}
