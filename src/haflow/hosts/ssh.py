"""The SSH host (hosts/base.py `Host`): each node on its own real server, reached over SSH, its
services run by that server's systemd.

Every server is its own `Machine` carrying one node. Per service one unit,
`haflow-CLUSTER-SERVICE.service` (Restart=on-failure, ordering from `Service.after`, logs in the
journal), grouped by `haflow-CLUSTER.target`; its environment sits in a 0600 file under
/etc/haflow/CLUSTER/env. Files live in the usual places (layout below). A service's instance is
systemd's InvocationID. All work on a server goes through one asyncssh connection and a helper
sent with each request (data/host_agent.py: one round trip per step), servers in parallel where
orchestration asks for it. Installation (apt, users, venvs from a wheelhouse) is in
hosts/ssh_provision.py.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shlex
import shutil
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import asyncssh

from haflow import distros
from haflow.components.base import DesiredState, Directory, File, Needs, Service
from haflow.errors import HaflowError
from haflow.facts import NodeLayout
from haflow.hosts.base import SERVICE_USERS, Change, Instance, Machine, Say, Target
from haflow.hosts.ssh_transport import Result, SshPool, SshTarget
from haflow.spec import Spec

CONF_BASE = Path("/etc/haflow")
DATA_BASE = Path("/var/lib/haflow")
RUN_BASE = Path("/run/haflow")
LOG_BASE = Path("/var/log/haflow")
VENVS = Path("/opt/haflow/venvs")
UNIT_DIR = Path("/etc/systemd/system")
TMPFILES_DIR = Path("/etc/tmpfiles.d")
ACTIVE = {"active", "activating", "reloading", "deactivating"}
JOURNAL_LINES = 15
PROBE_TIMEOUT_S = 8
# the longest TimeoutStopSec haflow writes (a Celery worker's warm shutdown: at most 600 s), plus
# time for systemd's SIGKILL and the round trip
STOP_WAIT_S = 600 + 120


class RemoteError(HaflowError):
    """A step failed on a server: names the server, the step and what it said."""


class SshHost:
    kind = "ssh"

    def __init__(self, spec: Spec, state_dir: Path, spec_dir: Path | None = None,
                 check: Callable[[str], None] | None = None, former: list[SshTarget] | tuple[SshTarget, ...] = ()) -> None:
        self.spec = spec
        self.cluster = spec.cluster
        self.state_dir = state_dir
        base = spec_dir or Path.cwd()

        def path(p: str | None) -> str | None:
            return str((base / p).expanduser()) if p else None

        self.targets = [SshTarget(n.name, n.ssh.host or n.address, n.ssh.user, n.ssh.port, path(n.ssh.key),
                                  path(n.ssh.known_hosts)) for n in spec.nodes if n.ssh]
        # servers of nodes that left the spec: reached only when asked (to stop or remove them)
        self.former = {t.name for t in former}
        self.pool = SshPool([*self.targets, *former], check)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="haflow-ssh", daemon=True)
        self._thread.start()
        self._facts: dict[str, dict[str, Any]] = {}
        self._unreachable: dict[str, str] | None = None
        self._connecting = threading.Lock()
        self._snapshots: dict[str, tuple[float, dict[str, Any]]] = {}
        self._desired: dict[tuple[str, str], DesiredState] = {}  # per (node, "node"|"machine"): as last applied
        self._agent = resources.files("haflow").joinpath("data", "host_agent.py").read_text()

    # --- plumbing ---------------------------------------------------------------------------------
    def _await(self, coro: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def connect(self) -> dict[str, str]:
        """Open every server's connection at once; returns the ones that failed, with why."""
        return self._await(self.pool.connect_all(self.node_names))

    def close(self) -> None:
        if self._loop.is_running():
            self._await(self.pool.close(), timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)

    def sh(self, node: str, command: str, stdin: str | bytes | None = None, timeout: float = 600) -> Result:
        """A shell command on the node's server, as root."""
        if node not in self.pool.targets:
            raise RemoteError(f"{node}: haflow does not know how to reach its server (it left the spec before haflow "
                              "recorded its ssh settings); put it back in the spec to stop or remove it")
        try:
            return self._await(self.pool.run(node, command, stdin, timeout))
        except (OSError, asyncssh.Error, asyncio.TimeoutError) as e:
            raise RemoteError(f"{node}: cannot reach {self.pool.targets[node].host} over SSH ({type(e).__name__}: {e}); "
                              "check the server is up and `ssh` to it works, then re-run") from None

    def upload(self, node: str, files: list[Path], remote_dir: PurePosixPath | Path) -> None:
        try:
            self._await(self.pool.upload(node, [str(f) for f in files], str(remote_dir)))
        except (OSError, asyncssh.Error) as e:
            raise RemoteError(f"{node}: copying files to {remote_dir} failed: {e}") from None

    def agent(self, node: str, verb: str, wait_s: float = 600, **request: Any) -> dict[str, Any]:
        """One request to the helper on the node's server (data/host_agent.py); `wait_s` bounds
        the round trip (a request's own `timeout` is the helper's)."""
        wait_s = max(wait_s, float(request.get("timeout") or 0) + 30)
        r = self.sh(node, f"python3 -c {shlex.quote(self._agent)}", json.dumps({"verb": verb, **request}), wait_s)
        try:
            answer = json.loads(r.stdout)
        except ValueError:
            raise RemoteError(f"{node}: {verb} failed on the server: {(r.stderr or r.stdout).strip()[-300:]}") from None
        if "error" in answer:
            raise RemoteError(f"{node}: {verb} failed on the server: {answer['error']}")
        return answer

    def each(self, fn: Callable[[str], Any], nodes: list[str] | None = None) -> dict[str, Any]:
        """fn(node) on every node's server at once."""
        names = nodes or self.node_names
        with ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
            return dict(zip(names, pool.map(fn, names)))

    @property
    def node_names(self) -> list[str]:
        return [t.name for t in self.targets]

    def facts(self, node: str) -> dict[str, Any]:
        """The server's OS, architecture, Python, addresses and listeners (asked once); with
        `skew_s`, how far its clock was from this machine's when it answered (within half the
        round trip: the answer is cached, so it is compared with the time it was asked, not now)."""
        if node not in self._facts:
            asked = time.time()
            answer = self.agent(node, "facts", disk_path=str(DATA_BASE))
            answered = time.time()
            answer["skew_s"] = max(0.0, abs(answer["time"] - (asked + answered) / 2) - (answered - asked) / 2)
            self._facts[node] = answer
        return self._facts[node]

    def recovery_hint(self) -> str:
        return (f"check the journal on the servers (`journalctl -u 'haflow-{self.cluster}-*'`) and re-run "
                "`haflow deploy`")

    # --- machines and layout ----------------------------------------------------------------------
    def machines(self) -> list[Machine]:
        return [Machine(n, (n,)) for n in self.node_names]

    def machine_layout(self, machine: Machine) -> NodeLayout:
        return self.layout(machine.nodes[0])

    def layout(self, node: str) -> NodeLayout:
        data = DATA_BASE / self.cluster
        return NodeLayout(
            root=CONF_BASE / self.cluster,
            services=data,
            db_root=data / "pg",
            run=RUN_BASE / self.cluster,
            logs=LOG_BASE / self.cluster,
            venvs=VENVS,
            db_user="postgres",
            task_logs=data / "airflow-task-logs",
            serve_task_logs=True,  # each server has its own disk: api-servers fetch logs from the workers
            users=tuple(SERVICE_USERS.items()),
            postgres_version=self._postgres_version(node),
        )

    def _postgres_version(self, node: str) -> int:
        wanted = self.spec.database.postgres_version
        if wanted is not None:
            return wanted
        f = self.facts(node)
        return distros.postgres_version(None, f["os_id"], f["os_version"])

    def unit(self, service: str) -> str:
        return f"haflow-{self.cluster}-{service}.service"

    @property
    def target_unit(self) -> str:
        return f"haflow-{self.cluster}.target"

    def env_file(self, service: str) -> Path:
        return CONF_BASE / self.cluster / "env" / f"{service}.env"

    # --- preflight --------------------------------------------------------------------------------
    def preflight(self, target: Target, listen: dict[tuple[str, int], str]) -> list[str]:
        """Why the server cannot run the node: an unsupported OS, no systemd, an old Python, the
        node's address missing, a port taken by someone else, a clock off, too little disk.
        Ports held by this cluster's own running units are not a problem."""
        node = _key(target)
        if isinstance(target, Machine):
            return []  # a server's machine-wide ports are its node's: checked with the node
        unreachable = self._reachability()
        if node in unreachable:
            return [unreachable[node]]
        f = self.facts(node)
        problems = self.same_release() if node == self.node_names[0] and not unreachable else []
        if not distros.find(f["os_id"], f["os_version"]):
            problems.append(f"{node}: runs {f['os_name'] or 'an unknown OS'}; haflow supports {distros.names()}")
        if f["init"] != "systemd":
            problems.append(f"{node}: its init is {f['init']}, not systemd; haflow runs services as systemd units")
        if f["arch"] not in ("x86_64", "aarch64"):
            problems.append(f"{node}: architecture {f['arch']} is not supported (x86_64, aarch64)")
        if tuple(int(x) for x in f["python"].split(".")) < (3, 11):
            problems.append(f"{node}: has Python {f['python']}; haflow needs python3 >= 3.11 on the server")
        address = self.spec.node(node).address
        if address not in f["addresses"]:
            problems.append(f"{node}: address {address} is not on the server (it has {', '.join(f['addresses'])}); "
                            "fix nodes[].address, or nodes[].ssh.host if you connect by another address")
        skew = f["skew_s"]
        if skew > 2:
            problems.append(f"{node}: its clock is {skew:.0f}s off this machine's; enable time sync (systemd-timesyncd or chrony)")
        elif not f["ntp_synchronized"] and not f["container"]:
            problems.append(f"{node}: its clock is not synchronised; enable systemd-timesyncd or chrony")
        if f["disk_free_bytes"] < MIN_FREE_BYTES:
            problems.append(f"{node}: only {f['disk_free_bytes'] / 2**30:.1f} GiB free under {DATA_BASE}; "
                            f"haflow needs {MIN_FREE_BYTES / 2**30:.0f} GiB")
        if not self.running(node):
            held = set(f["listening"])
            for (addr, port), field in sorted(listen.items()):
                if f"{addr}:{port}" in held or f"0.0.0.0:{port}" in held:
                    problems.append(f"{node}: {addr}:{port} ({field}) is already in use on the server; "
                                    f"stop that service or choose another {field}")
        return problems

    def _reachability(self) -> dict[str, str]:
        """Per server that cannot be used, why: no SSH connection, or no sudo without a password."""
        with self._connecting:  # preflight asks from one thread per server: connect once
            if self._unreachable is None:
                self._unreachable = self._find_unreachable()
        return self._unreachable

    def _find_unreachable(self) -> dict[str, str]:
        failed = self.connect()
        why = {}
        for t in self.targets:
            if t.name in failed:
                why[t.name] = (f"{t.name}: cannot connect to {t.user}@{t.host}:{t.port} ({failed[t.name]}); "
                               "check the address, nodes[].ssh (user, key, known_hosts) and that sshd runs")
            elif t.user != "root" and not self.sh(t.name, "true").ok:
                why[t.name] = (f"{t.name}: {t.user} cannot run sudo without a password; allow it "
                               f"(a sudoers line `{t.user} ALL=(ALL) NOPASSWD: ALL`) or connect as root")
        return why

    def same_release(self) -> list[str]:
        """All servers of a cluster run one release (one wheelhouse, one PostgreSQL version)."""
        releases = {n: (self.facts(n)["os_name"], self.facts(n)["python"], self.facts(n)["arch"]) for n in self.node_names}
        if len(set(releases.values())) <= 1:
            return []
        seen = "; ".join(f"{n}: {r[0]}, Python {r[1]}, {r[2]}" for n, r in releases.items())
        return [f"the servers differ ({seen}); every server of a cluster must run the same release and architecture"]

    # --- provisioning -----------------------------------------------------------------------------
    def missing(self, machine: Machine, needs: Needs) -> list[str]:
        from haflow.hosts import ssh_provision

        return ssh_provision.missing(self, machine.nodes[0], needs)

    def provision(self, machine: Machine, needs: Needs, say: Say) -> list[str]:
        from haflow.hosts import ssh_provision

        return ssh_provision.provision(self, machine.nodes[0], needs, say)

    # --- desired state ----------------------------------------------------------------------------
    def _full_state(self, node: str, desired: DesiredState) -> tuple[list[Directory], list[File]]:
        """The desired folders and files plus what systemd needs: units, env files, tmpfiles."""
        layout = self.layout(node)
        dirs = [Directory(CONF_BASE, 0o755), Directory(layout.root, 0o700), Directory(layout.root / "env", 0o700),
                Directory(DATA_BASE, 0o755), Directory(layout.services, 0o755), Directory(RUN_BASE, 0o755),
                Directory(layout.run, 0o755), Directory(LOG_BASE, 0o755), Directory(layout.logs, 0o750),
                *desired.dirs]
        files = list(desired.files)
        for s in desired.services:
            files.append(File(self.env_file(s.name), env_file_text(s.env), 0o600, "root"))
            files.append(File(UNIT_DIR / self.unit(s.name), self.unit_text(node, s), 0o644, "root"))
        files.append(File(UNIT_DIR / self.target_unit, self.target_text(), 0o644, "root"))
        runtime = [d for d in dirs if d.path == layout.run or layout.run in d.path.parents or d.path == RUN_BASE]
        files.append(File(TMPFILES_DIR / f"haflow-{self.cluster}-{node}.conf", tmpfiles_text(runtime), 0o644, "root"))
        return dirs, files

    def plan(self, target: Target, desired: DesiredState, diff: bool = False) -> list[Change]:
        node = _key(target)
        dirs, files = self._full_state(node, self._merged(node, desired, target))
        answer = self.agent(node, "apply", dry_run=True, diff=diff, dirs=_dirs_json(dirs), files=_files_json(files))
        defines = {str(p): name for name in self._merged_services(node)
                   for p in (UNIT_DIR / self.unit(name), self.env_file(name))}
        return [Change(node, Path(c["path"]), c["what"], c.get("diff"), defines.get(c["path"])) for c in answer["changes"]]

    def apply(self, target: Target, desired: DesiredState) -> list[Path]:
        node = _key(target)
        dirs, files = self._full_state(node, self._merged(node, desired, target))
        answer = self.agent(node, "apply", dirs=_dirs_json(dirs), files=_files_json(files))
        changed = [Path(c["path"]) for c in answer["changes"] if c["kind"] == "file"]
        if any(p.parent == UNIT_DIR for p in changed):
            self._systemctl(node, "daemon-reload")
        if any(p.parent == TMPFILES_DIR for p in changed):
            self.sh(node, "systemd-tmpfiles --create " + shlex.quote(str(TMPFILES_DIR / f"haflow-{self.cluster}-{node}.conf")))
        return changed

    def _merged(self, node: str, desired: DesiredState, target: Target) -> DesiredState:
        """A server carries its node and its machine-wide services (epmd): both are applied
        through the node's unit set, so the same files are never written twice by two callers."""
        key = "machine" if isinstance(target, Machine) else "node"
        self._desired[(node, key)] = desired
        merged = DesiredState()
        for part in ("node", "machine"):
            if (node, part) in self._desired:
                merged.extend(self._desired[(node, part)])
        return merged

    def unit_text(self, node: str, s: Service) -> str:
        after = " ".join(self.unit(a) for a in s.after)
        lines = [
            "# written by haflow: edits are overwritten by the next `haflow deploy`",
            "[Unit]",
            f"Description=haflow {self.cluster}: {s.name} on {node}",
            f"PartOf={self.target_unit}",
            "Wants=network-online.target",
            f"After=network-online.target {after}".rstrip(),
            "StartLimitIntervalSec=0",  # keep restarting a crashing service: the health gates judge it
            "",
            "[Service]",
            "Type=simple",
            f"User={s.user or 'root'}",
            f"WorkingDirectory={s.cwd or '/'}",
            f"EnvironmentFile={self.env_file(s.name)}",
            f"ExecStart={' '.join(_unit_quote(a) for a in s.argv)}",
        ]
        if s.reload_signal:
            lines.append(f"ExecReload=/bin/kill -s {s.reload_signal} $MAINPID")
        lines += [
            f"KillSignal=SIG{s.stop_signal}",
            "KillMode=mixed",  # the main process stops its children (Patroni its PostgreSQL) first
            f"TimeoutStopSec={s.stop_timeout_s}",
            "Restart=on-failure",
            "RestartSec=2",
            "LimitNOFILE=65536",
            f"SyslogIdentifier={s.name}",
            "",
            "[Install]",
            f"WantedBy={self.target_unit}",
            "",
        ]
        return "\n".join(lines)

    def target_text(self) -> str:
        return "\n".join([
            "# written by haflow",
            "[Unit]",
            f"Description=haflow cluster {self.cluster}: every service of this server",
            "Wants=network-online.target",
            "After=network-online.target",
            "",
            "[Install]",
            "WantedBy=multi-user.target",
            "",
        ])

    def _units(self, node: str) -> list[str]:
        merged = self._merged_services(node)
        return [self.unit(s) for s in merged]

    def _merged_services(self, node: str) -> list[str]:
        desired = self._desired
        return [s.name for part in ("node", "machine") if (node, part) in desired for s in desired[(node, part)].services]

    def _installed_units(self, node: str) -> list[str]:
        """The cluster's units on the server (from the disk, when this run applied nothing)."""
        return sorted(u for u in self.unit_states(node, [], glob=True) if u != self.target_unit)

    # --- systemd ----------------------------------------------------------------------------------
    def _systemctl(self, node: str, *args: str, check: bool = True, timeout: float = 600) -> Result:
        self._snapshots.pop(node, None)
        r = self.sh(node, "systemctl " + " ".join(shlex.quote(a) for a in args), timeout=timeout)
        if check and not r.ok:
            unit = next((a for a in args if a.endswith((".service", ".target"))), None)
            raise RemoteError(f"{node}: systemctl {' '.join(args)} failed: {r.stderr.strip()[-200:]}"
                              + (f"; last lines of its journal: {self.journal(node, unit)}" if unit else ""))
        return r

    def journal(self, node: str, unit: str, lines: int = JOURNAL_LINES) -> str:
        r = self.sh(node, f"journalctl -u {shlex.quote(unit)} -n {lines} --no-pager -o cat")
        return " | ".join(r.stdout.strip().splitlines()[-lines:])

    def unit_states(self, node: str, units: list[str], paths: dict[str, list[str]] | None = None,
                    glob: bool = False, timeout: float = 600) -> dict[str, Any]:
        """systemd's view of `units` (with `glob`: also every unit of this cluster installed on the
        server, and its target); a unit is `changed_since_start` when one of its `paths` was
        written after it started."""
        pattern = f"haflow-{self.cluster}-*.service" if glob else None
        extra = [self.target_unit] if glob else []
        return self.agent(node, "units", timeout, units=sorted({*units, *extra}), paths=paths or {}, glob=pattern,
                          unit_dir=str(UNIT_DIR))["units"]

    def _definition_paths(self, node: str) -> dict[str, list[str]]:
        return {self.unit(s): [str(UNIT_DIR / self.unit(s)), str(self.env_file(s))] for s in self._merged_services(node)}

    def _state(self, node: str, unit: str) -> dict[str, Any]:
        """A unit's state from one snapshot of every unit of the node (and whether its unit or
        env file changed since it started), taken at most STATE_TTL_S ago and dropped at every
        systemctl action on the node: a no-op deploy asks each server about once per layer
        instead of once per service and question."""
        snap = self._snapshots.get(node)
        if snap is None or time.monotonic() - snap[0] > STATE_TTL_S or unit not in snap[1]:
            paths = self._definition_paths(node)
            snap = (time.monotonic(), self.unit_states(node, sorted({*paths, unit, self.target_unit}), paths))
            self._snapshots[node] = snap
        return snap[1][unit]

    def boot(self, target: Target) -> bool:
        """The node's units and its target are enabled (a reboot brings the cluster back); the
        services themselves are started one by one by orchestration, behind its health gates."""
        node = _key(target)
        units = [*self._units(node), self.target_unit]
        off = [u for u in units if self._state(node, u)["enabled"] != "enabled"]
        if not off:
            return False
        self._systemctl(node, "enable", *off)
        return True

    def running(self, target: Target) -> bool:
        node = _key(target)
        try:
            # short: status asks this of a server that may be powered off or cut off
            states = self.unit_states(node, self._units(node), glob=True, timeout=PROBE_TIMEOUT_S)
        except RemoteError:
            return False
        return any(st["active"] in ACTIVE for st in states.values())

    def start(self, target: Target, service: str) -> bool:
        node = _key(target)
        unit = self.unit(service)
        if self._state(node, unit)["active"] in ACTIVE:
            return False
        r = self._systemctl(node, "start", unit, check=False)
        if not r.ok:
            raise RemoteError(f"{node}: could not start {service} ({unit}): {r.stderr.strip()[-200:]}; "
                              f"last lines of its journal: {self.journal(node, unit)}")
        return True

    def stop(self, target: Target, service: str) -> None:
        # systemd's own stop timeout ends a stop that hangs (SIGKILL): wait past it, or the
        # command gives up at the moment systemd would have finished the job
        self._systemctl(_key(target), "stop", self.unit(service), check=False, timeout=STOP_WAIT_S)

    def restart(self, target: Target, service: str) -> None:
        self._systemctl(_key(target), "restart", self.unit(service))

    def reload(self, target: Target, service: str) -> bool:
        node = _key(target)
        unit = self.unit(service)
        if self._state(node, unit)["active"] not in ACTIVE:
            return False
        self._systemctl(node, "reload-or-restart", unit)
        return True

    def instance(self, target: Target, service: str) -> Instance | None:
        node = _key(target)
        unit = self.unit(service)
        st = self.unit_states(node, [unit])[unit]
        if st["active"] not in ("active", "reloading") or not st["invocation"]:
            return None
        return Instance(node, service, st["invocation"])

    def stale(self, target: Target) -> list[str]:
        """Running services whose unit or environment file was written after they started."""
        node = _key(target)
        return [s for s in self._merged_services(node)
                if (st := self._state(node, self.unit(s)))["active"] in ACTIVE and st["changed_since_start"]]

    def changed_since_start(self, target: Target, service: str, paths: tuple[Path, ...]) -> bool:
        node = _key(target)
        unit = self.unit(service)
        st = self.unit_states(node, [unit], {unit: [str(p) for p in paths]})[unit]
        return st["active"] in ACTIVE and st["changed_since_start"]

    # --- one-shot commands and folders ------------------------------------------------------------
    def run(self, node: str, argv: list[str], env: dict[str, str], timeout: float = 600,
            user: str | None = None, cwd: Path | None = None) -> tuple[int, str]:
        answer = self.agent(node, "run", argv=argv, env=env, user=user, cwd=str(cwd) if cwd else None, timeout=timeout)
        return answer["rc"], answer["output"]

    def put_tree(self, node: str, source: Path, checksum: str, dest: Path, owner: str | None = None) -> bool:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            tar.add(source, arcname=".", filter=_no_bytecode)
        return self.agent(node, "put_tree", dest=str(dest), version=checksum[:12], owner=owner,
                          tar=base64.b64encode(buf.getvalue()).decode())["changed"]

    def tree_checksum(self, node: str, dest: Path) -> str | None:
        return self.agent(node, "tree_checksum", path=str(dest))["checksum"]

    # --- faults and stopping ----------------------------------------------------------------------
    def kill_service(self, node: str, service: str) -> list[Instance]:
        """A crash: SIGKILL to every process of the unit; systemd restarts it (Restart=on-failure)."""
        was = self.instance(node, service)
        if was is None:
            return []
        self._systemctl(node, "kill", "--signal=KILL", self.unit(service), check=False)
        return [was]

    def kill_node(self, target: Target) -> int:
        """Every service of the server dies at once and stays down (until `boot` and starts)."""
        node = _key(target)
        states = self.unit_states(node, self._units(node), glob=True)
        live = [u for u, st in states.items() if st["active"] in ACTIVE and u != self.target_unit]
        if live:
            self._snapshots.pop(node, None)
            self.sh(node, "systemctl kill --signal=KILL " + " ".join(live) + "; systemctl stop " + " ".join(live))
        return len(live)

    def stop_node(self, target: Target) -> None:
        """Stop every service of the server (the target stops what is part of it) and keep the
        cluster down across a reboot until the next deploy."""
        node = _key(target)
        if isinstance(target, Machine):
            return  # the server's node is stopped with the node
        units = self._installed_units(node)
        self._snapshots.pop(node, None)
        # a unit that failed on its way down (its journal keeps why) reads inactive afterwards,
        # as an orderly stop should leave it
        self.sh(node, f"systemctl stop {self.target_unit} {' '.join(units)}; systemctl reset-failed {' '.join(units)} 2>/dev/null; "
                      f"systemctl disable {self.target_unit} {' '.join(units)} 2>/dev/null; true")

    def leftovers(self, target: Target, timeout: float = 10.0) -> list[str]:
        node = _key(target)
        deadline = time.monotonic() + timeout
        while True:
            try:
                states = self.unit_states(node, self._units(node), glob=True)
            except RemoteError as e:
                return [str(e)]
            left = [f"{node}: {u} is {st['active']}" for u, st in states.items() if st["active"] in ACTIVE]
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(0.5)

    def purge_node(self, node: str) -> None:
        """Remove the cluster's units, configuration, data and logs from the node's server; the
        packages, users and venvs stay (other clusters may use them)."""
        layout = self.layout(node)
        units = " ".join(shlex.quote(str(UNIT_DIR / u)) for u in [*self._installed_units(node), self.target_unit])
        paths = " ".join(shlex.quote(str(p)) for p in (layout.root, layout.services, layout.run, layout.logs,
                                                        TMPFILES_DIR / f"haflow-{self.cluster}-{node}.conf"))
        r = self.sh(node, f"set -e; rm -rf {paths} {units} {UNIT_DIR}/{self.target_unit}.wants; systemctl daemon-reload")
        if not r.ok:
            raise RemoteError(f"{node}: could not remove the cluster's files: {r.stderr.strip()[-200:]}")

    def purge(self) -> None:
        """purge_node on every server, then the state directory."""
        self.each(self.purge_node)
        shutil.rmtree(self.state_dir, ignore_errors=True)  # its secrets and records: last, once the servers are clean


MIN_FREE_BYTES = 4 * 2**30
STATE_TTL_S = 3.0


def _key(target: Target) -> str:
    return target.nodes[0] if isinstance(target, Machine) else target


def _dirs_json(dirs: list[Directory]) -> list[dict[str, Any]]:
    seen: dict[Path, Directory] = {}
    for d in dirs:
        seen[d.path] = d
    return [{"path": str(d.path), "mode": d.mode, "owner": d.owner or "root"} for d in seen.values()]


def _files_json(files: list[File]) -> list[dict[str, Any]]:
    return [{"path": str(f.path), "mode": f.mode, "owner": f.owner or "root",
             "content": base64.b64encode(f.content.encode()).decode()} for f in files]


def _unit_quote(arg: str) -> str:
    """One ExecStart argument: double-quoted, C escapes for \\ and ", % and $ doubled."""
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$") + '"'


def env_file_text(env: dict[str, str]) -> str:
    """systemd EnvironmentFile: KEY="value", with \\, ", ` and $ escaped (literal, never expanded)."""
    def esc(v: str) -> str:
        return "".join("\\" + c if c in '\\"`$' else c for c in v)
    return "".join(f'{k}="{esc(v)}"\n' for k, v in sorted(env.items()))


def tmpfiles_text(dirs: list[Directory]) -> str:
    """Runtime folders (under /run) come back at every boot: systemd-tmpfiles makes them."""
    lines = ["# written by haflow: runtime folders of the cluster's services"]
    for d in sorted({d.path: d for d in dirs}.values(), key=lambda d: len(d.path.parts)):
        lines.append(f"d {d.path} {d.mode:04o} {d.owner or 'root'} - -")
    return "\n".join(lines) + "\n"


def _no_bytecode(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    name = Path(info.name)
    if "__pycache__" in name.parts or name.suffix == ".pyc":
        return None
    return info
