"""Run one command (`airflow dag-processor`) on exactly one node of the cluster at a time.

Airflow 3 requires a dag-processor but has no standby mode, and two processors on the same
bundle duplicate parsing and deactivate each other's DAGs (apache/airflow#32966). haflow runs
this elector on every node; the candidates race for a key in etcd bound to a lease:

- the winner starts the command and keeps the lease alive every ttl/3 seconds;
- if it cannot renew the lease before it would expire, it stops the command at once (another
  node may take over after the TTL), and competes again;
- losers read the key every second and race again only once it is gone: a read is no write in
  etcd's log, while each attempt is three (grant, txn, revoke), fsynced on every member, which
  was most of an idle cluster's etcd work (docs/benchmarks.md, idle);
- when the winner's node dies, its lease expires after at most `ttl` seconds (plus an etcd
  election if the dead node held etcd's leadership), the key vanishes and one loser wins.

So a takeover after a node loss is bounded by ttl + 1 s (+ etcd election) + the command's start.
The key's value is the winning node's name: `haflow status` shows it.

Usage: python dag_processor_elect.py --etcd URL [--etcd URL...] --key KEY --node NAME [--ttl S]
       [--user NAME] -- CMD...
With --user it logs in to etcd with the password in $HAFLOW_ETCD_PASSWORD (once etcd asks for a
login), and the command does not inherit that variable.
Standard library only: it runs in Airflow's venv.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request


def log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} elector: {msg}", flush=True)


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


PASSWORD_ENV = "HAFLOW_ETCD_PASSWORD"
AUTH_ERRORS = ("user name is empty", "invalid auth token", "permission denied", "auth: revision")


class Etcd:
    def __init__(self, urls: list[str], user: str | None = None, password: str | None = None) -> None:
        self.urls = urls
        self.user, self.password = user, password
        self.tokens: dict[str, str] = {}  # etcd's simple tokens live on the member that issued them

    def post(self, path: str, body: dict) -> dict:
        """POST to the first member that answers; raises OSError if none does."""
        last: Exception | None = None
        for url in self.urls:
            try:
                return self._post(url, path, body)
            except (urllib.error.URLError, OSError, ValueError) as e:
                last = e
        raise OSError(f"no etcd member answered: {last}")

    def _post(self, url: str, path: str, body: dict, login: bool = True) -> dict:
        headers = {"Content-Type": "application/json"}
        if url in self.tokens:
            headers["Authorization"] = self.tokens[url]
        req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            if login and self.user and any(a in text for a in AUTH_ERRORS):
                self.tokens.pop(url, None)
                self.tokens[url] = self._post(url, "/v3/auth/authenticate",
                                              {"name": self.user, "password": self.password}, login=False)["token"]
                return self._post(url, path, body, login=False)
            raise OSError(f"{url}{path}: HTTP {e.code} {text.strip()[:200]}") from None


class Elector:
    def __init__(self, etcd: Etcd, key: str, node: str, ttl: int, command: list[str]) -> None:
        self.etcd, self.key, self.node, self.ttl, self.command = etcd, key, node, ttl, command
        self.child: subprocess.Popen | None = None
        self.lease: str | None = None
        self.stopping = False

    def try_acquire(self) -> bool:
        lease = self.etcd.post("/v3/lease/grant", {"TTL": self.ttl})["ID"]
        txn = {
            "compare": [{"key": b64(self.key), "target": "CREATE", "create_revision": "0", "result": "EQUAL"}],
            "success": [{"request_put": {"key": b64(self.key), "value": b64(self.node), "lease": lease}}],
            "failure": [{"request_range": {"key": b64(self.key)}}],
        }
        if self.etcd.post("/v3/kv/txn", txn).get("succeeded"):
            self.lease = lease
            return True
        self.etcd.post("/v3/lease/revoke", {"ID": lease})
        return False

    def renew(self) -> bool:
        try:
            result = self.etcd.post("/v3/lease/keepalive", {"ID": self.lease}).get("result", {})
            return int(result.get("TTL", 0)) > 0
        except OSError:
            return False

    def start_child(self) -> None:
        log(f"{self.node} holds {self.key}: starting {' '.join(self.command)}")
        self.child = subprocess.Popen(self.command, start_new_session=True)

    def stop_child(self, why: str) -> None:
        if self.child is None or self.child.poll() is not None:
            self.child = None
            return
        log(f"stopping the command ({why})")
        os.killpg(self.child.pid, signal.SIGTERM)
        try:
            self.child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.child.pid, signal.SIGKILL)
            self.child.wait()
        self.child = None

    def lead(self) -> None:
        """Hold the lease while the command runs; give up the moment it cannot be renewed."""
        self.start_child()
        renewed_at = time.monotonic()
        while not self.stopping:
            time.sleep(self.ttl / 3)
            if self.renew():
                renewed_at = time.monotonic()
            elif time.monotonic() - renewed_at > self.ttl * 2 / 3:
                # The lease may expire any moment and another node take over: stop first.
                self.stop_child("lost the etcd lease")
                self.lease = None
                return
            if self.child is not None and self.child.poll() is not None:
                log(f"the command exited with {self.child.returncode}; restarting it")
                time.sleep(1)
                self.start_child()

    def release(self) -> None:
        self.stop_child("shutting down")
        if self.lease:
            try:
                self.etcd.post("/v3/lease/revoke", {"ID": self.lease})  # the key goes with it
            except OSError:
                pass

    def run(self) -> None:
        holder_seen = None
        while not self.stopping:
            try:
                holder = self._holder()
                if holder is None and self.try_acquire():
                    self.lead()
                    continue
                holder = holder or self._holder()  # another candidate won the race
                if holder != holder_seen:
                    log(f"standing by: {holder} holds {self.key}")
                    holder_seen = holder
            except OSError as e:
                log(f"etcd unreachable: {e}")
            time.sleep(1)

    def _holder(self) -> str | None:
        r = self.etcd.post("/v3/kv/range", {"key": b64(self.key)})
        kvs = r.get("kvs") or []
        return base64.b64decode(kvs[0]["value"]).decode() if kvs else None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--etcd", action="append", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--node", required=True)
    ap.add_argument("--ttl", type=int, default=10)
    ap.add_argument("--user")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    password = os.environ.pop(PASSWORD_ENV, None)  # the command (DAG parsing) must not inherit it
    elector = Elector(Etcd(args.etcd, args.user, password), args.key, args.node, args.ttl, command)

    def on_term(signum, frame):
        elector.stopping = True
        elector.release()
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    elector.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
