"""The external load balancer: what one in front of the cluster needs (`settings`), and whether a
real one does it (`check`).

The tutorial puts a cloud load balancer in front of the three servers: TCP 5432 to every node,
an HTTP health check on Patroni's REST port, path `/primary`, expecting 200, so that exactly one
target, the primary, is healthy at a time. haflow's own per-node HAProxy does the same inside
the cluster; this module covers the balancer the user runs (a cloud LB, keepalived + HAProxy,
...), which haflow does not configure but can describe and verify.

Health-check timings: the cloud balancers' usual minimums (AWS NLB 5 s interval / 2 s timeout,
unhealthy 2, as Autobase configures it; GCP and Hetzner allow shorter). The balancer follows a
new primary after `unhealthy_threshold` failed checks of the old one and `healthy_threshold`
passed checks of the new one, so at these settings within about 10-15 s of the promotion.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import psycopg

from haflow.cluster import Cluster
from haflow.components import patroni
from haflow.drills.writer import DEAD_PEER_FAILS_FAST
from haflow.errors import UserError
from haflow.facts import ClusterFacts
from haflow.hosts import lab_route_check

HEALTH_CHECK = {"interval_s": 5, "timeout_s": 2, "healthy_threshold": 2, "unhealthy_threshold": 2}
API_HEALTH_PATH = "/api/v2/monitor/health"
FOLLOW_TIMEOUT_S = 120
PROBE_EVERY_S = 0.25
HELD_CONNECTIONS = 3


def settings(facts: ClusterFacts) -> dict[str, Any]:
    """Per service the balancer carries: its port, targets, health check, and what to do with
    connections to a target that turns unhealthy. The `--json` of `haflow lb settings`."""
    ports = facts.spec.ports

    def targets(port: int, nodes: list[Any]) -> list[dict[str, Any]]:
        return [{"node": n.name, "address": n.address, "port": port} for n in nodes]

    def pg_service(name: str, path: str, listen: int, what: str) -> dict[str, Any]:
        return {
            "name": name, "what": what, "protocol": "tcp", "listen_port": listen,
            "targets": targets(ports.postgres, facts.database_nodes),
            "health_check": {"protocol": "http", "port": ports.patroni_api, "path": path, "expect_status": 200,
                             **HEALTH_CHECK},
            # a client left on a demoted primary would get read-only errors (or, across a
            # partition, write to a server about to be rewound): cut it, it reconnects
            "close_connections_to_unhealthy_targets": True,
        }

    return {
        "cluster": facts.name,
        "services": [
            pg_service("postgres-read-write", "/primary", ports.postgres,
                       "PostgreSQL writes: only the primary is healthy"),
            pg_service("postgres-read-only", "/replica", ports.postgres + 1,
                       "PostgreSQL reads: every streaming replica is healthy"),
            {
                "name": "airflow-api", "what": "the Airflow UI and REST API: every healthy api-server",
                "protocol": "tcp", "listen_port": ports.airflow_api, "targets": targets(ports.airflow_api, facts.airflow_nodes),
                "health_check": {"protocol": "http", "port": ports.airflow_api, "path": API_HEALTH_PATH,
                                 "expect_status": 200, **HEALTH_CHECK},
                "close_connections_to_unhealthy_targets": False,  # HTTP: in-flight requests may finish
            },
        ],
        "clients": ("PostgreSQL admits the nodes and database.allowed_clients: add the networks of the clients "
                    "(a balancer that keeps the client's address) or the balancer's own addresses (one that proxies)"),
    }


def parse_endpoint(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"{text!r} is not ADDRESS:PORT; give the balancer's address and PostgreSQL port, e.g. 10.0.0.10:5432")
    return host, int(port)


@dataclass
class Probe:
    at: float
    server: str | None  # the address of the PostgreSQL that answered, None: no answer
    in_recovery: bool | None
    error: str | None = None


@dataclass
class Check:
    endpoint: str
    primary: str | None = None
    reaches_primary: bool = False
    reached: str | None = None
    api_ok: bool | None = None
    follow_s: float | None = None
    switchover_s: float | None = None
    old_connections_closed: bool | None = None
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"ok": not self.problems, "endpoint": self.endpoint, "primary": self.primary,
                "reaches_primary": self.reaches_primary, "reached": self.reached, "api_ok": self.api_ok,
                "follow_s": self.follow_s, "switchover_s": self.switchover_s,
                "old_connections_closed": self.old_connections_closed, "problems": self.problems}


class Checker:
    def __init__(self, cluster: Cluster, endpoint: str) -> None:
        self.cluster = cluster
        self.host, self.port = parse_endpoint(endpoint)
        lab_route_check(self.host)  # a lab address only through the lab's bridge
        self.result = Check(endpoint)
        account = cluster.secrets["postgres_superuser"]
        self.user, self.password = account.username, account.password

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(host=self.host, port=self.port, user=self.user, password=self.password, dbname="postgres",
                               connect_timeout=3, autocommit=True, **DEAD_PEER_FAILS_FAST)

    def probe(self) -> Probe:
        """One fresh connection through the balancer: which server answered, and is it a primary."""
        t = time.time()
        try:
            with self.connect() as conn:
                addr, rec = conn.execute("SELECT host(inet_server_addr()), pg_is_in_recovery()").fetchone()
            return Probe(t, addr, rec)
        except psycopg.Error as e:
            return Probe(t, None, None, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)

    def node_at(self, address: str | None) -> str | None:
        """The node whose address answered (the address itself when it is no node's)."""
        return next((n.name for n in self.cluster.facts.nodes if n.address == address), address)

    def primary_address(self) -> tuple[str | None, str | None]:
        leader = patroni.probe(self.cluster.facts).leader
        return leader, self.cluster.facts.node(leader).address if leader else None

    def reaches(self) -> None:
        r = self.result
        leader, address = self.primary_address()
        r.primary = leader
        p = self.probe()
        r.reached = self.node_at(p.server)
        r.reaches_primary = p.server is not None and p.in_recovery is False and p.server == address
        if leader is None:
            r.problems.append("the cluster has no primary; run `haflow status`")
        elif p.server is None:
            r.problems.append(f"no PostgreSQL answers through {r.endpoint} ({p.error}); check the balancer's targets "
                              "and that its clients are in database.allowed_clients")
        elif not r.reaches_primary:
            r.problems.append(f"{r.endpoint} reaches {r.reached} ({'a replica' if p.in_recovery else 'a primary'}), "
                              f"not the primary {leader}; check its health check: port "
                              f"{self.cluster.spec.ports.patroni_api}, path /primary, expect 200")

    def api(self, url: str) -> None:
        try:
            resp = httpx.get(url.rstrip("/") + API_HEALTH_PATH, timeout=5)
            self.result.api_ok = resp.status_code == 200 and resp.json().get("metadatabase", {}).get("status") == "healthy"
        except (httpx.HTTPError, ValueError) as e:
            self.result.api_ok = False
            self.result.problems.append(f"the Airflow API through {url} does not answer ({type(e).__name__}: {e})")
            return
        if not self.result.api_ok:
            self.result.problems.append(f"the Airflow API through {url} answers {resp.status_code} on {API_HEALTH_PATH}, "
                                        "not a healthy metadatabase")

    def switchover(self) -> None:
        """A planned switchover, measured through the balancer: from when the new primary's
        Patroni first answers 200 on /primary (polled every 0.25 s) until new connections
        through the balancer reach it, and whether the connections held to the old primary were
        closed (not left on a demoted server)."""
        r = self.result
        _, candidate = patroni.switchover_plan(self.cluster.facts, None)
        new = self.cluster.facts.node(candidate)
        held = [self.connect() for _ in range(HELD_CONNECTIONS)]
        probes: list[Probe] = []
        promoted: list[float] = []
        stop = threading.Event()

        def keep_probing() -> None:
            while not stop.is_set():
                if not promoted and patroni.node_role(new, "/primary", timeout=1.0):
                    promoted.append(time.time())
                probes.append(self.probe())
                stop.wait(PROBE_EVERY_S)

        poller = threading.Thread(target=keep_probing, daemon=True, name="haflow-lb-probe")
        poller.start()
        t0 = time.time()
        try:
            self.cluster.switchover(to=candidate)
            r.switchover_s = round(time.time() - t0, 2)
            deadline = time.monotonic() + FOLLOW_TIMEOUT_S
            while time.monotonic() < deadline and (not promoted or _followed(probes, new.address, promoted[0]) is None):
                time.sleep(PROBE_EVERY_S)
        finally:
            stop.set()
            poller.join(timeout=10)
        r.primary = candidate
        last = next((p.server for p in reversed(probes) if p.server), None)
        r.reached = self.node_at(last)
        followed = _followed(probes, new.address, promoted[0]) if promoted else None
        r.follow_s = round(max(0.0, followed - promoted[0]), 2) if followed is not None else None
        if followed is None:
            r.problems.append(f"the balancer did not reach the new primary {candidate} within {FOLLOW_TIMEOUT_S} s "
                              "of the switchover; check its health check (path /primary, expect 200)")
        stale = [s for s in (_still_open_on(c) for c in held) if s is not None]
        r.old_connections_closed = not stale
        if stale:
            r.problems.append(f"{len(stale)} of {len(held)} connections held through the balancer still talk to a "
                              "demoted server; make the balancer close connections to unhealthy targets")


def _followed(probes: list[Probe], address: str, since: float, stable: int = 3) -> float | None:
    """The start of the first run of `stable` probes that all reached `address` as a primary."""
    run: list[Probe] = []
    for p in list(probes):
        if p.at < since:
            continue
        if p.server == address and p.in_recovery is False:
            run.append(p)
            if len(run) >= stable:
                return run[0].at
        else:
            run = []
    return None


def _still_open_on(conn: psycopg.Connection) -> str | None:
    """None when the connection was closed (as it must be after its server was demoted); the
    server's address when it still answers on a server in recovery."""
    try:
        addr, rec = conn.execute("SELECT host(inet_server_addr()), pg_is_in_recovery()").fetchone()
    except psycopg.Error:
        return None
    finally:
        try:
            conn.close()
        except psycopg.Error:
            pass
    return addr if rec else None


def check(cluster: Cluster, endpoint: str, api: str | None = None, switchover: bool = False) -> dict[str, Any]:
    checker = Checker(cluster, endpoint)
    checker.reaches()
    if api:
        checker.api(api)
    if switchover and checker.result.reaches_primary:
        checker.switchover()
    return checker.result.to_json()
