"""HAProxy on every node: the node's local entry point to the current primary and the replicas."""

from __future__ import annotations

import csv
import io
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

from haflow.components.base import DesiredState, Directory, File, LayerStatus, Needs, Package, Service
from haflow.facts import ClusterFacts, NodeFacts, NodeLayout
from haflow.rendering import render_template
from haflow.secrets import Secrets

NAME = "haproxy"
BINARY = "haproxy"
PRIMARY_PROXY = "postgres_primary"
REPLICAS_PROXY = "postgres_replicas"
AMQP_PROXY = "rabbitmq_amqp"
API_PROXY = "airflow_api"


# Backends no write waits on (read-only replicas, the api-servers, whose failed requests HAProxy
# replays on another server) check a healthy server this many times less often; a server that
# fails a check, or is down, is checked at the normal interval (fastinter/downinter), so a
# server coming back is seen as fast as before. Each check is a request to Patroni (which asks
# PostgreSQL) or to an api-server: 3 balancers x 3 servers every second each.
CALM_CHECK_FACTOR = 3


def config_text(facts: ClusterFacts, node: NodeFacts, layout: NodeLayout, secrets: Secrets) -> str:
    b = facts.spec.balancer
    stats = secrets["haproxy_stats"]
    return render_template(
        "haproxy.cfg.j2",
        cluster=facts.name,
        node=node,
        database_nodes=facts.database_nodes,
        airflow_nodes=facts.airflow_nodes,
        ports=facts.spec.ports,
        stats_socket=layout.haproxy_socket,
        rabbit_order=facts.rabbit_peers_in_order(node.name),
        inter=f"{b.check_interval_ms}ms",
        calm_inter=f"{b.check_interval_ms * CALM_CHECK_FACTOR}ms",
        fall=b.fall,
        rise=b.rise,
        stats_auth=f"{stats.username}:{stats.password}",
    )


def runs_on(node: NodeFacts) -> bool:
    return True  # every node's clients reach the cluster through their own balancer


def needs(facts: ClusterFacts, layout: NodeLayout) -> Needs:
    return Needs(packages=(Package("haproxy", "haproxy", commands=(BINARY,)),), users=tuple(u for u in [layout.user(NAME)] if u))


def render(facts: ClusterFacts, node: NodeFacts, layout: NodeLayout, secrets: Secrets) -> DesiredState:
    conf = layout.services / "haproxy.cfg"
    user = layout.user(NAME)
    return DesiredState(
        dirs=[Directory(layout.haproxy_run, 0o700, user)],  # its stats socket
        files=[File(conf, config_text(facts, node, layout, secrets), 0o600, user)],  # holds the stats password
        services=[
            Service(
                name=NAME,
                user=user,
                cwd=layout.haproxy_run,  # it returns to its start folder after reading the config
                # -db: stay in the foreground so the supervised PID is the one serving traffic.
                argv=(shutil.which(BINARY) or f"/usr/sbin/{BINARY}", "-db", "-f", str(conf)),
                stop_signal="USR1",  # soft stop: finish the current sessions
                stop_timeout_s=5,
                restart_files=(conf,),
            )
        ],
    )


# --- probes -----------------------------------------------------------------------------------


def server_states(node: NodeFacts, secrets: Secrets, timeout: float = 2.0,
                  client: httpx.Client | None = None) -> dict[str, dict[str, str]] | None:
    """{proxy: {server: "UP"|"DOWN"|...}} from the node's stats page, None if it does not answer
    (`client`: a kept-alive connection, for a caller that asks many times)."""
    stats = secrets["haproxy_stats"]
    try:
        r = (client or httpx).get(f"{node.haproxy_stats_url};csv", auth=(stats.username, stats.password), timeout=timeout)
        if r.status_code != 200:
            return None
    except httpx.HTTPError:
        return None
    states: dict[str, dict[str, str]] = {}
    for row in csv.DictReader(io.StringIO(r.text.lstrip("# "))):
        if row["svname"] in ("FRONTEND", "BACKEND"):
            continue
        states.setdefault(row["pxname"], {})[row["svname"]] = row["status"].split(" ")[0]
    return states


def force_primary(node: NodeFacts, secrets: Secrets, primary: str, others: list[str], timeout: float = 2.0,
                  client: httpx.Client | None = None) -> bool:
    """Tell one balancer now what its next checks will find: `primary` passes /primary, `others`
    fail it. After a switchover this routes at once instead of after `rise` checks of the new
    primary and `fall` checks of the old one, whose Patroni answers 200 until it has released
    the leader key (~2 s after its PostgreSQL stopped). The checks keep running and correct a
    wrong forced state. True when the balancer did both."""
    stats = secrets["haproxy_stats"]
    ok = True
    for action, servers in (("hdown", others), ("hrunn", [primary])):
        if not servers:
            continue
        form = {"s": servers, "action": action, "b": PRIMARY_PROXY}
        try:
            r = (client or httpx).post(node.haproxy_stats_url, data=form, auth=(stats.username, stats.password),
                                       timeout=timeout)
        except httpx.HTTPError:
            return False
        # HAProxy answers with a redirect whose ";st=" says what it did (DONE: every server)
        ok = ok and r.status_code == 303 and r.headers.get("location", "").endswith(";st=DONE")
    return ok


def route_all_to(facts: ClusterFacts, secrets: Secrets, primary: str, attempts: int = 10) -> list[str]:
    """Every balancer routes to the new primary now, not after its next checks: told, read
    back, and told again where a check that was under way undid it. Best effort: a balancer
    that does not take it follows its checks as before. Returns those that did not."""
    others = [n.name for n in facts.database_nodes if n.name != primary]
    balancers = list(facts.nodes)
    clients = {b.name: httpx.Client() for b in balancers}  # one kept-alive connection each

    def tell(node: NodeFacts) -> bool:
        """Tell it; True while it still routes elsewhere."""
        force_primary(node, secrets, primary, others, client=clients[node.name])
        states = server_states(node, secrets, timeout=1.0, client=clients[node.name])
        return states is not None and up_servers(states, PRIMARY_PROXY) != [primary]

    try:
        with ThreadPoolExecutor(max_workers=len(balancers)) as pool:
            for _ in range(attempts):
                balancers = [b for b, wrong in zip(balancers, pool.map(tell, balancers)) if wrong]
                if not balancers:
                    break
    finally:
        for c in clients.values():
            c.close()
    return [b.name for b in balancers]


def up_servers(states: dict[str, dict[str, str]], proxy: str) -> list[str]:
    return sorted(s for s, st in states.get(proxy, {}).items() if st == "UP")


@dataclass(frozen=True)
class BalancerMember:
    node: str
    healthy: bool
    primary_up: tuple[str, ...]
    replicas_up: tuple[str, ...]
    amqp_up: tuple[str, ...]
    api_up: tuple[str, ...]
    reason: str | None


@dataclass(frozen=True)
class BalancerStatus(LayerStatus):
    endpoints: dict[str, list[str]]
    members: tuple[BalancerMember, ...]

    @classmethod
    def unknown(cls, facts: ClusterFacts, reason: str) -> "BalancerStatus":
        members = tuple(BalancerMember(n, False, (), (), (), (), reason) for n in facts.node_names)
        return cls(healthy=False, problems=(reason,), endpoints=endpoints(facts), members=members)


def _member(node: str, states: dict[str, Any] | None, leader: str | None) -> BalancerMember:
    if states is None:
        return BalancerMember(node, False, (), (), (), (), "not answering")
    primary = tuple(up_servers(states, PRIMARY_PROXY))
    ok = leader is not None and primary == (leader,)
    return BalancerMember(node, ok, primary, tuple(up_servers(states, REPLICAS_PROXY)),
                          tuple(up_servers(states, AMQP_PROXY)), tuple(up_servers(states, API_PROXY)),
                          None if ok else f"primary port routes to {list(primary) or 'nothing'}")


def probe(facts: ClusterFacts, secrets: Secrets, leader: str | None) -> BalancerStatus:
    """Layer status: each node's balancer must route its primary port to exactly the leader."""
    members = tuple(_member(node.name, server_states(node, secrets), leader) for node in facts.nodes)
    problems = tuple(f"balancer on {m.node}: {m.reason}" for m in members if not m.healthy)
    return BalancerStatus(healthy=not problems, problems=problems, endpoints=endpoints(facts), members=members)


def endpoints(facts: ClusterFacts) -> dict[str, list[str]]:
    """What clients reach through the balancers (status --json `balancer.endpoints`)."""
    return {"postgres_primary": facts.pg_primary_endpoints, "postgres_replicas": facts.pg_replica_endpoints,
            "amqp": facts.amqp_endpoints, "api": facts.api_urls}
