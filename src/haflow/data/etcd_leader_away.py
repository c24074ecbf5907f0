"""Patroni on_role_change callback, installed by haflow: keep etcd's raft leader off the node
that runs the PostgreSQL primary.

Why: when a machine dies, etcd elects a new raft leader, and a new etcd leader extends every
lease by its full TTL (leases are not checkpointed). If the dead machine held both the etcd
leader and the Patroni leader key, the key therefore expires ~ttl + election time after the
crash instead of ttl minus the time since its last refresh: 21-23 s instead of 15-20 s with
ttl 20. Moving etcd leadership away when this node becomes primary avoids that.

Usage (Patroni appends ACTION ROLE SCOPE):
    python etcd_leader_away.py LOGIN_FILE LOCAL_CLIENT_URL PEER_CLIENT_URL... ACTION ROLE SCOPE
LOGIN_FILE (JSON {"name", "password"}, 0600, Patroni's user): the etcd account to log in with
once etcd asks for logins. Only root may move etcd's leadership.
Standard library only: it runs in Patroni's venv.
"""

import json
import sys
import urllib.error
import urllib.request

_tokens: dict[str, str] = {}
_login: dict = {}


def _raw(url: str, path: str, body: dict) -> dict:
    headers = {"Content-Type": "application/json"}
    if url in _tokens:
        headers["Authorization"] = _tokens[url]
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST", headers=headers)
    with urllib.request.urlopen(req, timeout=3) as r:
        return json.loads(r.read() or b"{}")


def post(url: str, path: str, body: dict) -> dict:
    try:
        return _raw(url, path, body)
    except urllib.error.HTTPError as e:
        if not _login or url in _tokens:
            raise
        text = e.read().decode(errors="replace")
        if "user name is empty" not in text and "permission denied" not in text:
            raise
    _tokens[url] = _raw(url, "/v3/auth/authenticate", _login)["token"]
    return _raw(url, path, body)


def main(argv: list[str]) -> int:
    login_file, *urls, _action, role, _scope = argv
    if role not in ("primary", "master") or not urls:
        return 0
    with open(login_file) as f:
        _login.update(json.load(f))
    local, peers = urls[0], urls[1:]
    status = post(local, "/v3/maintenance/status", {})
    if status.get("leader") != status.get("header", {}).get("member_id"):
        return 0  # this node's etcd member is not the leader: nothing to do
    for peer in peers:
        try:
            target = post(peer, "/v3/maintenance/status", {})["header"]["member_id"]
            post(local, "/v3/maintenance/transfer-leadership", {"targetID": target})
            print(f"etcd leadership moved to {peer}")
            return 0
        except Exception as e:  # an unreachable peer: try the next
            print(f"could not move etcd leadership to {peer}: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except Exception as e:  # never fail Patroni's callback over this optimisation
        print(f"etcd_leader_away: {e}", file=sys.stderr)
        sys.exit(0)
