"""One snapshot of every layer's health; probes of independent layers run concurrently."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from haflow.cluster import Cluster
from haflow.components import airflow, etcd, haproxy, patroni, pgbouncer, rabbitmq
from haflow.components.base import LayerStatus


def snapshot(cluster: Cluster) -> dict[str, Any]:
    """Every layer's probe (frozen dataclasses) rendered to the `status --json` schema."""
    facts = cluster.facts
    secrets = cluster.secrets if cluster.exists() else None
    not_created = "cluster not created yet"
    with ThreadPoolExecutor(max_workers=3 + len(facts.nodes)) as pool:
        dcs_f = pool.submit(etcd.probe, facts)
        db_f = pool.submit(patroni.probe, facts)
        broker_f = pool.submit(rabbitmq.probe, facts, secrets) if secrets else None
        pooler_f = pool.submit(pgbouncer.probe, facts, secrets) if secrets else None
        # "supervisor": the node's init runs (its supervisord here, systemd on a real host); each
        # server asked at once, so one that does not answer costs its timeout once
        inits = list(pool.map(cluster.host.running, facts.node_names))
        nodes = [{"node": n.name, "address": n.address, "supervisor": up} for n, up in zip(facts.nodes, inits)]
        dcs, database = dcs_f.result(), db_f.result()
    balancer = (haproxy.probe(facts, secrets, database.leader) if secrets
                else haproxy.BalancerStatus.unknown(facts, not_created))
    airflow_layer = (cluster.airflow_probe() if secrets
                     else airflow.AirflowStatus.unknown(facts, cluster.dags.status(), not_created))
    broker = broker_f.result() if broker_f else rabbitmq.BrokerStatus.unknown(facts, not_created)
    pooler = pooler_f.result() if pooler_f else pgbouncer.PoolerStatus.unknown(facts, not_created)
    layers: dict[str, LayerStatus] = {"dcs": dcs, "database": database, "balancer": balancer, "pooler": pooler,
                                      "broker": broker, "airflow": airflow_layer}
    running = cluster.removed_nodes_running()
    removed = [{"node": n, "running": n in running} for n in cluster.state.removed_nodes(cluster.spec)]
    return {
        "cluster": facts.name,
        "healthy": all(layer.healthy for layer in layers.values()) and not any(r["running"] for r in removed),
        "state_dir": str(cluster.state_dir),
        "nodes": nodes,
        "removed_nodes": removed,
        "layers": {name: layer.to_json() for name, layer in layers.items()},
    }


def problems(snap: dict[str, Any]) -> list[str]:
    """Why the cluster is not healthy, one short line per reason, for the table."""
    out = []
    layers = snap["layers"]
    for n in snap["nodes"]:
        if not n["supervisor"]:
            out.append(f"{n['node']}: node is down (its supervisor is not running); `haflow up` restarts it")
    for r in snap.get("removed_nodes", []):
        if r["running"]:
            out.append(f"{r['node']}: no longer in the spec but still running; `haflow down` stops it")
    out += [f"dcs: {p}" for p in layers["dcs"].get("problems", [])]
    out += [f"database: {p}" for p in layers["database"].get("problems", [])]
    for m in layers["balancer"]["members"]:
        if not m["healthy"]:
            out.append(f"balancer on {m['node']}: {m['reason']}")
    out += [p for p in layers["pooler"].get("problems", [])]
    out += [f"broker: {p}" for p in layers["broker"].get("problems", [])]
    out += [f"airflow: {p}" for p in layers["airflow"].get("problems", [])]
    return out
