"""Patroni managing the distro PostgreSQL: one member per node, synchronous mode, pg_rewind.

Patroni supervises PostgreSQL itself (it restarts a crashed postmaster and double-forks it out
of its own process tree), so haflow supervises Patroni only and never starts postgres directly.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from haflow.components import etcd
from haflow.components.base import DesiredState, Directory, File, Forks, LayerStatus, Needs, Package, Service, Venv, data_text
from haflow.facts import ClusterFacts, NodeFacts, NodeLayout
from haflow.secrets import Secrets

NAME = "patroni"

# Cluster-wide parameters Patroni needs for streaming replication and pg_rewind.
BASE_PARAMETERS: dict[str, Any] = {
    "wal_level": "replica",
    "hot_standby": "on",
    "max_wal_senders": 10,
    "max_replication_slots": 10,
    "wal_keep_size": "256MB",
    "wal_log_hints": "on",
    "password_encryption": "scram-sha-256",
}


def venv_dir_for(venvs: Path, version: str) -> Path:
    return venvs / f"patroni-{version}"


def venv_dir(layout: NodeLayout, version: str) -> Path:
    return venv_dir_for(layout.venvs, version)


def requirement(version: str) -> str:
    return f"patroni[etcd3,psycopg3]=={version}"


def bin_dir(postgres_version: int) -> Path:
    return Path(f"/usr/lib/postgresql/{postgres_version}/bin")


def config_path(layout: NodeLayout) -> Path:
    return layout.db_root / "patroni.yml"


def pg_hba(facts: ClusterFacts, secrets: Secrets) -> list[str]:
    repl = secrets["postgres_replication"].username
    lines = ["local all all scram-sha-256"]
    for net in facts.pg_client_networks:
        lines.append(f"host replication {repl} {net} scram-sha-256")
        lines.append(f"host all all {net} scram-sha-256")
    for net in facts.spec.database.allowed_clients:  # clients of an external balancer: no replication
        lines.append(f"host all all {net} scram-sha-256")
    return lines


CALLBACK_SCRIPT = "etcd_leader_away.py"
CALLBACK_LOGIN = "etcd-callback-login.json"  # etcd's root: only root may move etcd's leadership


def callback_login(layout: NodeLayout) -> Path:
    return layout.db_root / CALLBACK_LOGIN


def callback_command(facts: ClusterFacts, node: NodeFacts, layout: NodeLayout) -> str:
    """on_role_change: keep etcd's leader off the primary's node (see data/etcd_leader_away.py)."""
    venv = venv_dir(layout, facts.spec.database.patroni_version)
    local = [node.etcd_client_url] if node.is_etcd_member else []
    peers = [m.etcd_client_url for m in facts.etcd_members if m.name != node.name]
    return " ".join([str(venv / "bin/python"), str(layout.db_root / CALLBACK_SCRIPT), str(callback_login(layout)), *local, *peers])


def dynamic_config(facts: ClusterFacts) -> dict[str, Any]:
    """Patroni's cluster-wide settings, kept in etcd: written at bootstrap, reconciled by `up`."""
    db = facts.spec.database
    return {
        "ttl": db.ttl,
        "loop_wait": db.loop_wait,
        "retry_timeout": db.retry_timeout,
        "maximum_lag_on_failover": db.maximum_lag_on_failover,
        "synchronous_mode": db.synchronous_mode,
        "failsafe_mode": db.failsafe_mode,
        "postgresql": {
            "use_pg_rewind": True,
            "use_slots": True,
            "parameters": {**BASE_PARAMETERS, **db.parameters},
        },
    }


# A fresh cluster's replicas stream only after the leader created their slots in its next loop
# (field notes P5): bootstrap runs the short loop, and `up` then reconciles the spec's loop_wait.
BOOTSTRAP_LOOP_WAIT = 5


def bootstrap_dynamic_config(facts: ClusterFacts) -> dict[str, Any]:
    conf = dynamic_config(facts)
    conf["loop_wait"] = min(conf["loop_wait"], BOOTSTRAP_LOOP_WAIT)
    return conf


def config_drift(desired: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """The part of `desired` that `current` does not match (values compared as strings, since
    Patroni keeps some parameters as strings)."""
    patch: dict[str, Any] = {}
    for key, want in desired.items():
        have = current.get(key)
        if isinstance(want, dict):
            sub = config_drift(want, have if isinstance(have, dict) else {})
            if sub:
                patch[key] = sub
        elif str(have).lower() != str(want).lower():
            patch[key] = want
    return patch


def reconcile_dynamic_config(facts: ClusterFacts, secrets: Secrets, leader: NodeFacts) -> dict[str, Any]:
    """PATCH Patroni's /config with what the spec says and etcd does not; returns the patch."""
    auth = (secrets["patroni_restapi"].username, secrets["patroni_restapi"].password)
    current = httpx.get(f"{leader.patroni_api_url}/config", timeout=5).json()
    patch = config_drift(dynamic_config(facts), current)
    if patch:
        r = httpx.patch(f"{leader.patroni_api_url}/config", json=patch, auth=auth, timeout=10)
        r.raise_for_status()
    return patch


def config(facts: ClusterFacts, node: NodeFacts, layout: NodeLayout, secrets: Secrets) -> dict[str, Any]:
    api = f"{node.address}:{facts.spec.ports.patroni_api}"
    accounts = {
        role: {"username": secrets[key].username, "password": secrets[key].password}
        for role, key in (
            ("superuser", "postgres_superuser"),
            ("replication", "postgres_replication"),
            ("rewind", "postgres_rewind"),
        )
    }
    return {
        "scope": facts.patroni_scope,
        "namespace": facts.patroni_namespace,
        "name": node.name,
        "log": {"level": "INFO", "format": "%(asctime)s %(levelname)s: %(message)s"},
        "restapi": {
            "listen": api,
            "connect_address": api,
            # GETs (health checks) stay open; changes (switchover, restart, ...) need these.
            "authentication": {
                "username": secrets["patroni_restapi"].username,
                "password": secrets["patroni_restapi"].password,
            },
        },
        # its own etcd user: read-write on its namespace only (etcd.ensure_auth)
        "etcd3": {"hosts": facts.etcd_hosts, "username": secrets["etcd_patroni"].username,
                  "password": secrets["etcd_patroni"].password},
        "bootstrap": {
            "dcs": bootstrap_dynamic_config(facts),
            "initdb": [{"encoding": "UTF8"}, {"locale": "C.UTF-8"}, "data-checksums"],
        },
        "postgresql": {
            "listen": node.postgres,
            "connect_address": node.postgres,
            "data_dir": str(layout.pg_data),
            "bin_dir": str(bin_dir(layout.postgres_version)),
            "pgpass": str(layout.pg_home / "pgpass"),
            "authentication": accounts,
            # Per node: several nodes on one machine would otherwise share /var/run/postgresql.
            "parameters": {"unix_socket_directories": str(layout.pg_socket_dir)},
            "pg_hba": pg_hba(facts, secrets),
            # a new or rebuilt replica's base backup starts at once: a spread checkpoint made a
            # new member wait ~2 min on the lab for a database of a few MiB
            "basebackup": [{"checkpoint": "fast"}],
            "callbacks": {"on_role_change": callback_command(facts, node, layout)},
        },
        "watchdog": {"mode": "off"},
        "tags": {"nofailover": False, "noloadbalance": False, "clonefrom": False, "nosync": False},
    }


def runs_on(node: NodeFacts) -> bool:
    return "database" in node.roles


def needs(facts: ClusterFacts, layout: NodeLayout) -> Needs:
    pg = layout.postgres_version
    version = facts.spec.database.patroni_version
    server = Package(f"postgresql-{pg}", f"PostgreSQL {pg} server", paths=(bin_dir(pg) / "postgres", bin_dir(pg) / "pg_rewind"))
    return Needs(packages=(server,), venvs=(Venv(venv_dir(layout, version), (requirement(version),), layout.db_user),))


def postmaster(layout: NodeLayout) -> Forks:
    """Patroni double-forks PostgreSQL: the postmaster outlives a killed Patroni. It is the
    postgres serving this node's data directory, named by the pid file in it."""
    return Forks(pidfile=layout.pg_data / "postmaster.pid", marker=str(layout.pg_data), stop_signal="INT")


def render(facts: ClusterFacts, node: NodeFacts, layout: NodeLayout, secrets: Secrets) -> DesiredState:
    if not runs_on(node):
        return DesiredState()
    conf = config_path(layout)
    venv = venv_dir(layout, facts.spec.database.patroni_version)
    user = layout.db_user
    return DesiredState(
        dirs=[
            Directory(layout.pg_home, 0o700, user),
            Directory(layout.pg_socket_dir, 0o700, user),
        ],
        files=[
            File(conf, yaml.safe_dump(config(facts, node, layout, secrets), sort_keys=False), 0o600, user),
            File(layout.db_root / CALLBACK_SCRIPT, data_text(CALLBACK_SCRIPT), 0o644),
            File(callback_login(layout), json.dumps({"name": secrets["etcd_root"].username,
                                                     "password": secrets["etcd_root"].password}), 0o600, user),
        ],
        services=[
            Service(
                name=NAME,
                argv=(str(venv / "bin" / "patroni"), str(conf)),
                env={"HOME": str(layout.pg_home), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"},
                user=user,
                cwd=layout.pg_home,
                stop_timeout_s=60,
                restart_files=(conf,),
                reload_signal="HUP",  # Patroni re-reads patroni.yml (and its etcd login) on SIGHUP
                forks=postmaster(layout),
                after=(etcd.NAME,),
            )
        ],
    )


# --- probes -----------------------------------------------------------------------------------


def leader_key(facts: ClusterFacts) -> str:
    """The etcd key Patroni's leader holds (its lock): `{namespace}{scope}/leader`."""
    return f"{facts.patroni_namespace}{facts.patroni_scope}/leader"


def _view_of(node: NodeFacts, timeout: float) -> dict[str, Any] | None:
    try:
        r = httpx.get(f"{node.patroni_api_url}/cluster", timeout=timeout)
        return r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def _leaders(view: dict[str, Any]) -> list[str]:
    return [m.get("name") for m in view.get("members", []) if m.get("role") == "leader"]


def cluster_view(facts: ClusterFacts, timeout: float = 2.0) -> dict[str, Any] | None:
    """Patroni's `/cluster` document: each member answers from its own copy of the DCS, and a
    member just back from a partition names itself leader until its next loop. So the first
    view that agrees with the leader key in etcd (a quorum read) wins; without an answer from
    etcd, the first view there is."""
    holder = etcd.get_key(facts, leader_key(facts), timeout=1.0)
    first = None
    for node in facts.database_nodes:
        view = _view_of(node, timeout)
        if view is None:
            continue
        if holder is None or _leaders(view) == [holder]:
            return view
        first = first or view
    return first


def node_role(node: NodeFacts, path: str, timeout: float = 1.0, client: httpx.Client | None = None) -> bool:
    """True if the node's REST API answers 200 on a health path such as /primary (`client`: a
    kept-alive connection, for a caller that polls)."""
    try:
        return (client or httpx).get(f"{node.patroni_api_url}{path}", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


PROMOTION_GRACE_S = 5  # after Patroni reported the switchover, how long the promotion may still take


def await_promotion(facts: ClusterFacts, candidate: str, leader: str, timeout: float, request: Future) -> float | None:
    """Seconds until the candidate's Patroni answers 200 on /primary (what the balancers check)
    and the old leader's no longer does (it may, briefly, after the promotion: a balancer that
    checked it then would route to it again), polled every 50 ms while `request` (the
    switchover request to Patroni) runs; None if not within `timeout` or the request failed
    (its caller reports why)."""
    node, old, t0 = facts.node(candidate), facts.node(leader), time.monotonic()
    deadline = t0 + timeout
    with httpx.Client() as client:  # kept alive: a poll costs milliseconds, not a connection
        while time.monotonic() < deadline and not (request.done() and request.exception()):
            if (node_role(node, "/primary", timeout=0.5, client=client)
                    and not node_role(old, "/primary", timeout=0.5, client=client)):
                return time.monotonic() - t0
            if request.done():  # Patroni saw the candidate take the leader key: its promotion is near
                deadline = min(deadline, time.monotonic() + PROMOTION_GRACE_S)
            time.sleep(0.05)
    return None


@dataclass(frozen=True)
class DbMember:
    node: str
    role: str | None  # leader, sync_standby, replica; None: Patroni does not list it
    state: str  # running, streaming, ... or "unreachable"
    lag_bytes: int | None
    timeline: int | None
    pending_restart: bool


@dataclass(frozen=True)
class DatabaseStatus(LayerStatus):
    leader: str | None
    members: tuple[DbMember, ...]


def _member(name: str, m: dict[str, Any] | None) -> DbMember:
    if m is None:
        return DbMember(name, None, "unreachable", None, None, False)
    lag = m.get("lag")
    return DbMember(name, m.get("role"), m.get("state") or "unknown",
                    lag if isinstance(lag, int) else (0 if m.get("role") == "leader" else None),
                    m.get("timeline"), bool(m.get("pending_restart")))


def probe(facts: ClusterFacts) -> DatabaseStatus:
    """Layer status: one running leader, every other member streaming, a synchronous standby."""
    view = cluster_view(facts) or {"members": []}
    by_name = {m.get("name"): m for m in view.get("members", [])}
    members = [_member(name, by_name.get(name)) for name in facts.names_with_role("database")]
    leaders = [m for m in members if m.role == "leader" and m.state == "running"]
    problems = []
    if len(leaders) != 1:
        problems.append("no running leader" if not leaders else "more than one leader")
    not_streaming = [m.node for m in members
                     if m not in leaders and not (m.role in ("replica", "sync_standby") and m.state == "streaming")]
    if not_streaming:
        problems.append(f"not streaming: {', '.join(not_streaming)}")
    if facts.spec.database.synchronous_mode and not any(m.role == "sync_standby" for m in members):
        problems.append("no synchronous standby")
    return DatabaseStatus(healthy=not problems, problems=tuple(problems),
                          leader=leaders[0].node if len(leaders) == 1 else None, members=tuple(members))


# --- planned switchover -------------------------------------------------------------------------

MAX_SWITCHOVER_LAG_BYTES = 1024 * 1024


def switchover_plan(facts: ClusterFacts, to: str | None) -> tuple[str, str]:
    """(leader, candidate) for a planned switchover, or a UserError saying why it is unsafe."""
    from haflow.errors import UserError

    state = probe(facts)
    leader = state.leader
    if leader is None:
        raise UserError("no running primary to switch over from; run `haflow status` and `haflow up` first")
    members = {m.node: m for m in state.members}
    sync = [n for n, m in members.items() if m.role == "sync_standby" and m.state == "streaming"]
    if facts.spec.database.synchronous_mode and not sync:
        raise UserError("refusing: no healthy synchronous standby, a switchover could lose acknowledged writes; "
                        "wait for `haflow status` to show one")
    if to is not None:
        facts.node(to)  # unknown node -> UserError naming the known ones
        if to == leader:
            raise UserError(f"{to} is already the primary")
    candidate = to or (sync[0] if sync else next((n for n, m in members.items() if m.state == "streaming"), None))
    if candidate is None:
        raise UserError("refusing: no streaming replica to switch over to")
    m = members[candidate]
    if m.state != "streaming":
        raise UserError(f"refusing: {candidate} is {m.state}, not a streaming replica")
    if facts.spec.database.synchronous_mode and candidate not in sync:
        raise UserError(f"refusing: {candidate} is not the synchronous standby ({', '.join(sync)}); in synchronous "
                        "mode only it has every acknowledged write: use --to " + sync[0])
    if (m.lag_bytes or 0) > MAX_SWITCHOVER_LAG_BYTES:
        raise UserError(f"refusing: {candidate} lags {m.lag_bytes} bytes behind (limit {MAX_SWITCHOVER_LAG_BYTES}); retry when it caught up")
    return leader, candidate


def restart_postgres(facts: ClusterFacts, secrets: Secrets, node: str) -> None:
    """Restart one member's PostgreSQL through Patroni (only if a parameter change awaits it)."""
    auth = (secrets["patroni_restapi"].username, secrets["patroni_restapi"].password)
    r = httpx.post(f"{facts.node(node).patroni_api_url}/restart", json={"restart_pending": True}, auth=auth, timeout=120)
    if r.status_code not in (200, 202):
        from haflow.errors import HaflowError

        raise HaflowError(f"{node}: Patroni could not restart PostgreSQL ({r.status_code}): {r.text.strip()}; "
                          "data is kept, re-run `haflow up`")


def pending_restart(layer: DatabaseStatus) -> list[str]:
    """Members of a `probe` result whose PostgreSQL awaits a restart for a changed parameter."""
    return [m.node for m in layer.members if m.pending_restart]


def request_switchover(facts: ClusterFacts, secrets: Secrets, leader: str, candidate: str) -> None:
    auth = (secrets["patroni_restapi"].username, secrets["patroni_restapi"].password)
    node = facts.node(leader)
    r = httpx.post(f"{node.patroni_api_url}/switchover", json={"leader": leader, "candidate": candidate}, auth=auth, timeout=30)
    if r.status_code != 200:
        from haflow.errors import HaflowError

        raise HaflowError(f"Patroni refused the switchover ({r.status_code}): {r.text.strip()}")


def wake_up(facts: ClusterFacts, secrets: Secrets, node: str) -> bool:
    """Make `node`'s Patroni run its HA cycle now rather than after loop_wait: a PATCH of
    /config that changes nothing (Patroni writes nothing to etcd and wakes its loop up).
    Best effort: False when it does not answer."""
    auth = (secrets["patroni_restapi"].username, secrets["patroni_restapi"].password)
    url = f"{facts.node(node).patroni_api_url}/config"
    try:
        loop_wait = httpx.get(url, timeout=2).json().get("loop_wait")
        if loop_wait is None:
            return False
        return httpx.patch(url, json={"loop_wait": loop_wait}, auth=auth, timeout=2).status_code == 200
    except (httpx.HTTPError, ValueError, AttributeError):
        return False
