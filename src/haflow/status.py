"""One snapshot of every layer's health; probes of independent layers run concurrently."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from haflow.cluster import Cluster
from haflow.components import etcd, haproxy, patroni


def snapshot(cluster: Cluster) -> dict[str, Any]:
    facts = cluster.facts
    with ThreadPoolExecutor(max_workers=3) as pool:
        dcs_f = pool.submit(etcd.probe, facts)
        db_f = pool.submit(patroni.probe, facts)
        nodes = [
            {"node": n.name, "address": n.address, "supervisor": cluster.host.node_up(n.name)} for n in facts.nodes
        ]
        dcs, database = dcs_f.result(), db_f.result()
    balancer = haproxy.probe(facts, database["leader"])
    layers = {"dcs": dcs, "database": database, "balancer": balancer}
    return {
        "cluster": facts.name,
        "healthy": all(layer["healthy"] for layer in layers.values()),
        "state_dir": str(cluster.state_dir),
        "nodes": nodes,
        "layers": layers,
    }


def problems(snap: dict[str, Any]) -> list[str]:
    """Why the cluster is not healthy, one short line per reason, for the table."""
    out = []
    layers = snap["layers"]
    for n in snap["nodes"]:
        if not n["supervisor"]:
            out.append(f"{n['node']}: node is down (its supervisor is not running); `haflow up` restarts it")
    out += [f"dcs: {p}" for p in layers["dcs"].get("problems", [])]
    out += [f"database: {p}" for p in layers["database"].get("problems", [])]
    for m in layers["balancer"]["members"]:
        if not m["healthy"]:
            out.append(f"balancer on {m['node']}: {m['reason']}")
    return out
