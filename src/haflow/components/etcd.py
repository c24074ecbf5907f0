"""etcd: the DCS. One member per node listed in `etcd.members`, v3 API only.

Authentication is on (`ensure_auth`): Patroni logs in as its own user with read-write on its
namespace only, the dag-processor elector on its one key only, and haflow as root. Without a
login nobody reaching port 2379 can rewrite Patroni's leader key or configuration.
"""

from __future__ import annotations

import base64
import shutil
import time
from dataclasses import dataclass
from typing import Any

import httpx
import yaml

from haflow.components.base import DesiredState, Directory, File, LayerStatus, Needs, Package, Service
from haflow.errors import ClusterUnhealthy
from haflow.facts import ClusterFacts, NodeFacts, NodeLayout
from haflow.secrets import Account, Secrets

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
    join = facts.etcd_join(node.name)
    return {
        "name": node.name,
        "data-dir": str(layout.etcd_data),
        "listen-client-urls": node.etcd_client_url,
        "advertise-client-urls": node.etcd_client_url,
        "listen-peer-urls": node.etcd_peer_url,
        "initial-advertise-peer-urls": node.etcd_peer_url,
        "initial-cluster": join.initial_cluster,
        "initial-cluster-token": facts.etcd_token,
        "initial-cluster-state": join.state,
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


def runs_on(node: NodeFacts) -> bool:
    return node.is_etcd_member


def needs(facts: ClusterFacts, layout: NodeLayout) -> Needs:
    return Needs(packages=(Package("etcd-server", "etcd", commands=(BINARY,)),
                           Package("etcd-client", "etcdctl", commands=("etcdctl",))),
                 users=tuple(u for u in [layout.user(NAME)] if u))


def render(facts: ClusterFacts, node: NodeFacts, layout: NodeLayout, secrets: Secrets | None = None) -> DesiredState:
    if not runs_on(node):
        return DesiredState()
    conf = layout.services / "etcd.yaml"
    user = layout.user(NAME)
    return DesiredState(
        dirs=[Directory(layout.etcd_data, 0o700, user)],
        files=[File(conf, yaml.safe_dump(config(facts, node, layout), sort_keys=False), 0o600, user)],
        services=[
            Service(
                name=NAME,
                argv=(shutil.which(BINARY) or f"/usr/bin/{BINARY}", "--config-file", str(conf)),
                user=user,
                cwd=layout.etcd_data,
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


@dataclass(frozen=True)
class EtcdMember:
    node: str
    healthy: bool
    db_size_bytes: int | None


@dataclass(frozen=True)
class EtcdStatus(LayerStatus):
    leader: str | None
    cluster_version: str | None
    quota_bytes: int
    alarms: tuple[str, ...]
    members: tuple[EtcdMember, ...]


def probe(facts: ClusterFacts) -> EtcdStatus:
    """Layer status: every member healthy, a leader, the cluster version decided, no alarm."""
    members, names = [], {}
    for n in facts.etcd_members:
        status = _post(n, "/v3/maintenance/status", 2.0) or {}
        names[status.get("header", {}).get("member_id")] = n.name
        size = status.get("dbSize")
        members.append(EtcdMember(n.name, member_health(n), int(size) if size else None))
    leader = leader_name(facts)
    version = cluster_version(facts)
    raised = alarms(facts, names) or []
    problems = [f"etcd alarm {a} (NOSPACE: compact and defragment, then `etcdctl alarm disarm`)" for a in raised]
    big = [m.node for m in members if m.db_size_bytes and m.db_size_bytes > QUOTA_BYTES * 0.8]
    if big:
        problems.append(f"etcd database above 80 % of its {QUOTA_BYTES} byte quota on {', '.join(big)}")
    if leader is None:
        problems.append("no etcd leader (quorum lost?)")
    bad = [m.node for m in members if not m.healthy]
    if bad:
        problems.append(f"etcd member(s) not healthy: {', '.join(bad)}")
    if _version_tuple(version) < MIN_CLUSTER_VERSION:
        problems.append(f"etcd cluster version {version or 'undecided'} (waiting for >= 3.4)")
    return EtcdStatus(healthy=not problems, problems=tuple(problems), leader=leader, cluster_version=version,
                      quota_bytes=QUOTA_BYTES, alarms=tuple(raised), members=tuple(members))


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


# --- membership -------------------------------------------------------------------------------
# A new member joins as a learner: it does not vote (quorum stays what it was while it has not
# started or caught up) and is promoted once etcd says it is in sync.
PROMOTE_TIMEOUT_S = 120
ADD_TIMEOUT_S = 60


def add_learner(facts: ClusterFacts, node: NodeFacts) -> str:
    """Add `node` to the running cluster as a learner (once: a re-run finds it added) and return
    the initial-cluster its first boot needs: every member, itself included."""
    members = _members(facts) or []
    deadline = time.monotonic() + ADD_TIMEOUT_S
    while not any(node.etcd_peer_url in m.get("peerURLs", []) for m in members):
        r = _first_answer(facts, "/v3/cluster/member/add", {"peerURLs": [node.etcd_peer_url], "isLearner": True})
        if r is not None and r.status_code == 200:
            members = r.json().get("members", [])
        elif r is not None and "unhealthy cluster" in r.text and time.monotonic() < deadline:
            time.sleep(1)  # etcd adds members only when every voter has been connected for 5 s
        else:
            why = r.text.strip() if r is not None else "no member answered"
            raise ClusterUnhealthy(f"etcd refused to add {node.name} as a member: {why}; data is kept, run "
                                   "`haflow status`, then re-run")
    # the new member has no name until it boots: it is the one with our peer URL
    return ",".join(f"{m.get('name') or node.name}={url}" for m in members for url in m.get("peerURLs", []))


def learners(facts: ClusterFacts) -> list[str]:
    """Members that do not vote yet (node names)."""
    return [_member_name(facts, m) for m in _members(facts) or [] if m.get("isLearner")]


def promote_learners(facts: ClusterFacts, timeout: float = PROMOTE_TIMEOUT_S) -> list[str]:
    """Promote every learner to a voting member as soon as etcd deems it in sync; returns
    their names. Raises ClusterUnhealthy if one does not catch up within `timeout`."""
    promoted: list[str] = []
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        members = _members(facts)
        pending = [m for m in members or [] if m.get("isLearner")]
        if members is not None and not pending:
            return promoted
        for m in pending:
            r = _first_answer(facts, "/v3/cluster/member/promote", {"ID": m["ID"]})
            if r is not None and r.status_code == 200:
                promoted.append(_member_name(facts, m))
            elif r is not None:
                last = r.text.strip()
        if time.monotonic() > deadline:
            names = ", ".join(_member_name(facts, m) for m in pending) or "(no member answered)"
            raise ClusterUnhealthy(f"etcd learner {names} did not catch up within {timeout:.0f}s ({last or 'no answer'}); "
                                   "data is kept: check its etcd log, then re-run")
        time.sleep(1)


def remove_member(facts: ClusterFacts, node: NodeFacts) -> bool:
    """Remove `node`'s member (found by its peer URL); False if etcd has no such member."""
    for m in _members(facts) or []:
        if node.etcd_peer_url in m.get("peerURLs", []):
            _call(facts, "/v3/cluster/member/remove", {"ID": m["ID"]})
            return True
    return False


def _member_name(facts: ClusterFacts, member: dict[str, Any]) -> str:
    """A member's node (it has no name of its own until it booted): by its peer URL."""
    urls = member.get("peerURLs", [])
    return next((n.name for n in facts.nodes if n.etcd_peer_url in urls), member.get("name") or ",".join(urls))


def _members(facts: ClusterFacts) -> list[dict[str, Any]] | None:
    """etcd's member list, None if no member answers."""
    r = _first_answer(facts, "/v3/cluster/member/list", {})
    return r.json().get("members", []) if r is not None and r.status_code == 200 else None


def _first_answer(facts: ClusterFacts, path: str, body: dict[str, Any]) -> httpx.Response | None:
    """The answer of the first member that answers (as haflow), None if none does."""
    for m in facts.etcd_members:
        r = _request(m.etcd_client_url, path, body, 5.0)
        if r is not None:
            return r
    return None


# --- authentication ---------------------------------------------------------------------------

ROOT_ROLE = "root"
# etcd's simple tokens are kept by the member that issued them: one per client URL.
_logins: dict[str, Account] = {}  # client URL -> haflow's root account there
_tokens: dict[str, str] = {}
AUTH_ERRORS = ("user name is empty", "invalid auth token", "permission denied", "auth: revision")


def use_root(facts: ClusterFacts, secrets: Secrets) -> None:
    """haflow's own calls log in as root once etcd asks for a login."""
    for m in facts.etcd_members:
        if _logins.get(m.etcd_client_url) != secrets["etcd_root"]:
            # another cluster on the same address (purged and recreated in one process): its
            # token would hang the requests of an etcd without authentication
            _tokens.pop(m.etcd_client_url, None)
        _logins[m.etcd_client_url] = secrets["etcd_root"]


def service_roles(facts: ClusterFacts) -> dict[str, tuple[str, bytes, bytes]]:
    """secret name -> (role, key, range end): what each service account may read and write."""
    ns = f"{facts.patroni_namespace}{facts.patroni_scope}/".encode()
    elector = dag_processor_key(facts).encode()
    return {
        "etcd_patroni": ("patroni", ns, _prefix_end(ns)),
        "etcd_elector": ("dag-processor-elector", elector, b""),  # this one key
    }


def dag_processor_key(facts: ClusterFacts) -> str:
    return f"/haflow/{facts.name}/dag-processor"


def _prefix_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _authenticate(url: str, account: Account, timeout: float) -> tuple[str | None, str]:
    """(token, "") when the login worked, else (None, etcd's error text)."""
    try:
        r = httpx.post(f"{url}/v3/auth/authenticate", json={"name": account.username, "password": account.password},
                       timeout=timeout)
    except httpx.HTTPError as e:
        return None, f"unreachable: {e}"
    if r.status_code == 200:
        return r.json().get("token"), ""
    return None, r.text


def auth_enabled(facts: ClusterFacts, secrets: Secrets, timeout: float = 3.0) -> bool:
    """Whether etcd asks for a login (asked of the first member that answers). A root password
    etcd refuses is an error: the secrets file does not belong to this cluster's etcd."""
    root = secrets["etcd_root"]
    for m in facts.etcd_members:
        token, error = _authenticate(m.etcd_client_url, root, timeout)
        if token:
            _tokens[m.etcd_client_url] = token
            return True
        if "not enabled" in error:
            return False
        if "authentication failed" in error:
            raise ClusterUnhealthy("etcd refuses the root password in the secrets file (restored from another cluster?); "
                                   "restore this cluster's secrets file and re-run `haflow up`")
    raise ClusterUnhealthy("no etcd member answered a login; run `haflow status`")


def ensure_auth(facts: ClusterFacts, secrets: Secrets) -> list[str]:
    """Turn authentication on with root plus one least-privilege user per service, or bring the
    users of a cluster that has it in line with the secrets. Idempotent; returns what it did."""
    use_root(facts, secrets)
    done = []
    enabled = auth_enabled(facts, secrets)
    if not enabled:
        root = secrets["etcd_root"]
        _grant(facts, root.username, root.password, ROOT_ROLE, None)
    for name, (role, key, end) in service_roles(facts).items():
        account = secrets[name]
        if enabled and _authenticate(facts.etcd_members[0].etcd_client_url, account, 3.0)[0]:  # it logs in already
            continue
        _grant(facts, account.username, account.password, role, (key, end))
        done.append(f"etcd user {account.username}: read-write on {key.decode()}{'*' if end else ''} only")
    if not enabled:
        _call(facts, "/v3/auth/enable", {})
        done.append("etcd authentication enabled (root for haflow, one user per service)")
    return done


def _grant(facts: ClusterFacts, user: str, password: str, role: str, keys: tuple[bytes, bytes] | None) -> None:
    """User with password and role, the role with read-write on `keys`; what exists is kept."""
    _call(facts, "/v3/auth/role/add", {"name": role}, ok="already exists")
    if keys:
        key, end = keys
        perm = {"permType": "READWRITE", "key": _b64(key), **({"range_end": _b64(end)} if end else {})}
        _call(facts, "/v3/auth/role/grant", {"name": role, "perm": perm})
    if _call(facts, "/v3/auth/user/add", {"name": user, "password": password}, ok="already exists") is None:
        _call(facts, "/v3/auth/user/changepw", {"name": user, "password": password})
    _call(facts, "/v3/auth/user/grant", {"user": user, "role": role})


def _call(facts: ClusterFacts, path: str, body: dict[str, Any], ok: str | None = None) -> dict[str, Any] | None:
    """An auth API call on the first member that answers; None if it failed with `ok` in the
    error (e.g. "already exists"); any other failure raises."""
    r = _first_answer(facts, path, body)
    if r is not None and r.status_code == 200:
        return r.json()
    if r is not None and ok and ok in r.text:
        return None
    last = r.text if r is not None else ""
    raise ClusterUnhealthy(f"etcd refused {path}: {last.strip() or 'no member answered'}; data is kept, re-run `haflow up`")


def _request(url: str, path: str, body: dict[str, Any], timeout: float) -> httpx.Response | None:
    """POST as haflow: unauthenticated while etcd allows it, else with root's token (logging in
    again when the token expired or the member never issued one)."""
    for attempt in range(2):
        headers = {"Authorization": _tokens[url]} if url in _tokens else {}
        try:
            r = httpx.post(f"{url}{path}", json=body, headers=headers, timeout=timeout)
        except httpx.HTTPError:
            # etcd 3.4 without authentication never answers a request that carries a token it
            # did not issue: the next call goes without
            _tokens.pop(url, None)
            return None
        if attempt == 0 and r.status_code != 200 and any(e in r.text for e in AUTH_ERRORS) and url in _logins:
            token, _ = _authenticate(url, _logins[url], timeout)
            if token:
                _tokens[url] = token
                continue
        return r
    return None


def _post_body(node: NodeFacts, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any] | None:
    r = _request(node.etcd_client_url, path, body, timeout)
    try:
        return r.json() if r is not None and r.status_code == 200 else None
    except ValueError:
        return None


def get_key(facts: ClusterFacts, key: str, timeout: float = 2.0) -> str | None:
    """A key's value (as haflow, from the first member that answers); None if absent."""
    for m in facts.etcd_members:
        got = _post_body(m, "/v3/kv/range", {"key": _b64(key.encode())}, timeout)
        if got is not None:
            kvs = got.get("kvs") or []
            return base64.b64decode(kvs[0]["value"]).decode() if kvs else None
    return None
