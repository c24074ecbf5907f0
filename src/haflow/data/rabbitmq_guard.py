"""Bring this RabbitMQ node back into its cluster when a healed partition left it outside.

With `cluster_partition_handling = pause_minority` a node cut off from the majority pauses and
rejoins by itself once it sees the majority again. But when the network comes back while the
cut is still being detected (net ticks) or the pause is under way, Mnesia can stay split for
good: the node runs, its peers list it under `partitions`, and nothing heals it
(rabbitmq/rabbitmq-server#17319; the lab's node-partition drill hit it once in a few runs).
RabbitMQ's documented recovery is to restart the nodes outside the partition one trusts.

This guard does that for its own node only, when the answer is certain:
- this node's application runs and sees only a minority of the cluster running, and
- a peer answers over the network and sees a majority running, without this node,
- continuously for `--grace` seconds.
Then it runs `rabbitmqctl stop_app` and `start_app` on this node (it rejoins the majority's
Mnesia and quorum queues). A paused node (its API is down), a node in the majority and a node
that cannot reach the majority never act.

Usage: python3 rabbitmq_guard.py --node NAME --url URL --peer URL [--peer URL...] --members N
       --ctl PATH --user NAME [--interval S] [--grace S]
The management password is in $HAFLOW_RABBITMQ_PASSWORD; rabbitmqctl does not inherit it.
Standard library only.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

PASSWORD_ENV = "HAFLOW_RABBITMQ_PASSWORD"


def log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} rabbitmq-guard: {msg}", flush=True)


def running_seen_by(url: str, auth: str, timeout: float = 3.0) -> set[str] | None:
    """The RabbitMQ nodes the node behind `url` sees running; None when it does not answer
    (its application is stopped or paused, or it cannot be reached)."""
    request = urllib.request.Request(f"{url}/api/nodes?columns=name,running", headers={"Authorization": auth})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return {n["name"] for n in json.load(r) if n.get("running")}
    except (OSError, ValueError, KeyError, TypeError, urllib.error.URLError):
        return None


def majority(running: set[str], members: int) -> bool:
    return 2 * len(running) > members


def outside_majority(me: str, mine: set[str] | None, peers: list[set[str] | None], members: int) -> bool:
    """True when this node runs in a minority while a reachable peer runs in a majority
    without it: the split that pause_minority did not resolve."""
    if mine is None or majority(mine, members):
        return False
    return any(p is not None and me not in p and majority(p, members) for p in peers)


def rejoin(ctl: str) -> bool:
    env = {k: v for k, v in os.environ.items() if k != PASSWORD_ENV}
    for action in ("stop_app", "start_app"):
        r = subprocess.run([ctl, action], env=env, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            log(f"rabbitmqctl {action} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-300:]}")
            return False
    return True


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--node", required=True, help="this node's RabbitMQ name")
    ap.add_argument("--url", required=True, help="this node's management API")
    ap.add_argument("--peer", action="append", default=[], help="a peer's management API")
    ap.add_argument("--members", type=int, required=True, help="RabbitMQ nodes in the cluster")
    ap.add_argument("--ctl", required=True, help="rabbitmqctl")
    ap.add_argument("--user", required=True)
    ap.add_argument("--interval", type=float, default=5.0)
    ap.add_argument("--grace", type=float, default=30.0)
    args = ap.parse_args(argv)
    token = base64.b64encode(f"{args.user}:{os.environ.get(PASSWORD_ENV, '')}".encode()).decode()
    auth = f"Basic {token}"
    since: float | None = None
    log(f"watching {args.node} ({args.members} nodes, acting after {args.grace:g} s outside the majority)")
    while True:
        mine = running_seen_by(args.url, auth)
        # the peers are asked only when this node is in a minority (the healthy path stays one request)
        peers = [] if mine is None or majority(mine, args.members) else [running_seen_by(p, auth) for p in args.peer]
        if not outside_majority(args.node, mine, peers, args.members):
            if since is not None:
                log("back in the majority")
            since = None
        elif since is None:
            since = time.monotonic()
            log(f"outside the majority: this node sees {sorted(mine or ())} running, a peer sees the majority without it")
        elif time.monotonic() - since >= args.grace:
            log(f"still outside the majority after {args.grace:g} s: restarting the RabbitMQ application to rejoin")
            log("rejoined" if rejoin(args.ctl) else "rejoin failed; trying again later")
            since = None
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
