"""A writer that runs on one server and writes straight into that server's PostgreSQL, so it
keeps trying when the server is cut off from everything else, this machine included.

The node-partition drill starts it on the primary's server before the cut and reads its log
after the heal: a write the isolated old primary acknowledged after the cut would be a split
brain (the majority elects its own primary meanwhile). Each attempt is one `psql` process (a
fresh connection, so a demoted server's refusal shows at once) and one log line: `start end
ok|err id`, times from the server's clock (preflight keeps it within 2 s of this machine's; the
lab shares this machine's).

It runs as a transient systemd unit outside the cluster's unit names (so `status`, crash drills
and `down` never take it for a service of the cluster), stops itself after `duration_s` and is
stopped and removed by `stop`. The password reaches it in a 0600 pgpass file, never on a
command line.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from haflow.cluster import Cluster
from haflow.drills.writer import TABLE
from haflow.errors import HaflowError


@dataclass(frozen=True)
class Attempt:
    start: float
    end: float
    ok: bool
    id: int


@dataclass
class IsolatedLog:
    attempts: list[Attempt] = field(default_factory=list)

    def acknowledged_after(self, t: float) -> list[Attempt]:
        """Writes begun after `t` and acknowledged."""
        return [a for a in self.attempts if a.ok and a.start > t]

    def acknowledged_before(self, t: float) -> list[Attempt]:
        return [a for a in self.attempts if a.ok and a.end <= t]

    def first_refusal_after(self, t: float) -> float | None:
        """When the server first answered a write with an error after `t` (a write hanging on
        the lost synchronous standby ends with one when Patroni demotes the server)."""
        return min((a.end for a in self.attempts if not a.ok and a.end > t), default=None)


def parse(text: str) -> IsolatedLog:
    log = IsolatedLog()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2] in ("ok", "err"):
            log.attempts.append(Attempt(float(parts[0]), float(parts[1]), parts[2] == "ok", int(parts[3])))
    return log


def _pgpass_line(host: str, port: int, db: str, user: str, password: str) -> str:
    esc = lambda v: str(v).replace("\\", "\\\\").replace(":", "\\:")  # noqa: E731
    return ":".join(esc(v) for v in (host, port, db, user, password))


class IsolatedWriter:
    def __init__(self, cluster: Cluster, node: str, run_id: int, interval_s: float = 0.1) -> None:
        self.cluster = cluster
        self.node = node
        self.run_id = run_id
        self.interval_s = interval_s
        layout = cluster.host.layout(node)
        self.unit = f"haflow-drill-{cluster.spec.cluster}-writer"
        self.log_path = layout.run / "drill-writer.log"
        self.pgpass = layout.run / "drill-writer.pgpass"
        self.psql = f"/usr/lib/postgresql/{layout.postgres_version}/bin/psql"

    def _run(self, argv: list[str], env: dict[str, str] | None = None) -> str:
        rc, out = self.cluster.host.run(self.node, argv, env or {}, timeout=60)
        if rc != 0:
            raise HaflowError(f"{self.node}: the drill's writer on the server: `{shlex.join(argv[:3])}` failed: {out.strip()[-300:]}")
        return out

    def start(self, duration_s: float) -> None:
        facts, secrets = self.cluster.facts, self.cluster.secrets
        node = facts.node(self.node)
        account = secrets["postgres_airflow"]
        port = self.cluster.spec.ports.postgres
        line = _pgpass_line(node.address, port, facts.airflow_db, account.username, account.password)
        self._run(["sh", "-c", f'umask 077; printf "%s\\n" "$PGPASS_LINE" > {shlex.quote(str(self.pgpass))}; '
                               f': > {shlex.quote(str(self.log_path))}'], {"PGPASS_LINE": line})
        base = self.run_id * 10_000_000
        insert = f"INSERT INTO {TABLE} (id) VALUES ($id)"
        loop = (f"n=0; while :; do n=$((n+1)); id=$(({base}+n)); s=$(date +%s.%N); "
                f"if {self.psql} -X -q -v ON_ERROR_STOP=1 -h {node.address} -p {port} -U {shlex.quote(account.username)} "
                f"-d {shlex.quote(facts.airflow_db)} -c \"{insert}\" >/dev/null 2>&1; then r=ok; else r=err; fi; "
                f"echo \"$s $(date +%s.%N) $r $id\" >> {shlex.quote(str(self.log_path))}; sleep {self.interval_s}; done")
        self._run(["systemd-run", f"--unit={self.unit}", "--collect", "--quiet",
                   f"--property=RuntimeMaxSec={int(duration_s)}", f"--setenv=PGPASSFILE={self.pgpass}",
                   "--setenv=PGCONNECT_TIMEOUT=2", "/bin/sh", "-c", loop])

    def read(self) -> IsolatedLog:
        return parse(self._run(["cat", str(self.log_path)]))

    def stop(self) -> IsolatedLog:
        """Stop the writer, remove its files, return its log."""
        self.cluster.host.run(self.node, ["systemctl", "stop", f"{self.unit}.service"], {}, timeout=60)
        log = self.read()
        self._run(["rm", "-f", str(self.pgpass), str(self.log_path)])
        return log
