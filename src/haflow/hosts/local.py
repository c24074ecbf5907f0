"""The local host (hosts/base.py `Host`): every node of the cluster on this machine, each on its
own address; the machine itself is one `Machine` carrying them all.

Each node gets one supervisord (its "init"), started detached so it survives the CLI. It owns
the node's services, restarts them on crash, and is itself tracked by PID + start time. The
machine's own services (epmd) get a supervisord of their own. A lost machine is simulated by
SIGKILLing the node's supervisord and then everything it ran: nothing restarts until `boot`
starts the node's supervisord again. What a service forks (`Service.forks`, e.g. PostgreSQL's
postmaster) is recorded at `apply`, so a stop or a kill finds it without knowing what it is.
"""

from __future__ import annotations

import getpass
import hashlib
import ipaddress
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import xmlrpc.client
from pathlib import Path
from typing import Any

import psutil
from supervisor.xmlrpc import SupervisorTransport

from haflow import distros
from haflow.components.base import DesiredState, Directory, File, Needs, Service
from haflow.errors import HaflowError, UserError
from haflow.facts import NodeLayout
from haflow.fsutil import atomic_write, tree_checksum
from haflow.hosts import local_provision
from haflow.hosts.base import SERVICE_USERS, Change, Instance, Machine, Say, Target
from haflow.hosts.local_provision import default_db_user, is_root, reachable_by
from haflow.hosts.procs import ProcRef, wait_gone
from haflow.rendering import render_template

AGENT_FILE = "agent.json"
SERVICES_FILE = "services.json"  # per target: what each service forks and how it reloads
MACHINE = "_host"  # the folder of the machine's own supervisor (epmd); node names cannot start with "_"
MACHINE_NAME = "local"
DB_DIR = "pg"
DB_RELOCATION_BASE = Path("/var/lib/haflow/db")
SERVICES_BASE = Path("/var/lib/haflow/clusters")
# As root, each service runs as its own system user (hosts/base.py SERVICE_USERS); PostgreSQL
# runs as `postgres` (NodeLayout.db_user).
# Folders a cluster made by haflow < 0.9 kept in the state directory (every service ran as root).
IN_STATE_DIR_SERVICES = ("etcd", "rabbitmq", "airflow")
RUNNING_STATES = {"RUNNING", "STARTING"}


def default_venvs_dir() -> Path:
    if env := os.environ.get("HAFLOW_VENVS"):
        return Path(env)
    if is_root():
        return Path("/var/lib/haflow/venvs")
    return Path.home() / ".local/share/haflow/venvs"


def runtime_base(state_dir: Path) -> Path:
    """A short, per-state-dir directory for sockets (unix socket paths max out at 107 bytes)."""
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:10]
    base = Path("/run/haflow") if is_root() and Path("/run").is_dir() else Path(f"/tmp/haflow-{os.getuid()}")
    return base / digest


class LocalHost:
    kind = "local"

    def __init__(self, state_dir: Path, cluster: str, nodes: tuple[str, ...] = (),
                 postgres_wanted: int | None = None) -> None:
        self.state_dir = state_dir
        # the spec's version, else this machine's release's own (read once: layout is asked often)
        self.postgres_version = distros.postgres_version(postgres_wanted, *distros.os_release())
        self.cluster = cluster
        self.nodes = tuple(nodes)
        self.run_base = runtime_base(state_dir)
        self._relocated: bool | None = None
        self._outside: bool | None = None
        self._stopped: dict[str, list[ProcRef]] = {}  # per target: what stop_node saw running

    def recovery_hint(self) -> str:
        return f"check the logs under {self.state_dir}/nodes/*/logs and re-run `haflow up`"

    # --- machines and layout --------------------------------------------------------------------
    def machines(self) -> list[Machine]:
        return [Machine(MACHINE_NAME, self.nodes)]

    def machine_layout(self, machine: Machine) -> NodeLayout:
        return self.layout(MACHINE)

    def layout(self, node: str) -> NodeLayout:
        root = self.state_dir / "nodes" / node
        outside = self.services_outside()
        shared = self._services_base() if outside else self.state_dir
        return NodeLayout(
            root=root,
            services=self._services_base() / node if outside else root,
            db_root=self._db_base() / node if self._db_relocated() else root / DB_DIR,
            run=self.run_base / node,
            logs=root / "logs",
            venvs=default_venvs_dir(),
            db_user=default_db_user(),
            # All nodes share this machine's disk: one task log folder serves every api-server,
            # and Airflow's log servers (which bind every address) stay off.
            task_logs=shared / "airflow-task-logs",
            serve_task_logs=False,
            users=tuple(SERVICE_USERS.items()) if outside else (),
            postgres_version=self.postgres_version,
        )

    def services_outside(self) -> bool:
        """As root, every service runs as its own user, which cannot reach a private (0700)
        state directory: their files live under /var/lib/haflow/clusters, one folder per
        service owned by its user. Decided once per cluster, from the disk when it exists."""
        if self._outside is None:
            placed = self._services_placed_outside()
            self._outside = is_root() if placed is None else placed
        return self._outside

    def services_run_as_root(self) -> bool:
        """A cluster created by an older haflow keeps its service data in the state directory,
        where only root reaches it: its services keep running as root."""
        return is_root() and not self.services_outside()

    def _services_placed_outside(self) -> bool | None:
        if any(d.is_dir() and not d.is_symlink()
               for name in IN_STATE_DIR_SERVICES for d in (self.state_dir / "nodes").glob(f"*/{name}")):
            return False
        return True if self._services_base().is_dir() else None

    def _services_base(self) -> Path:
        return SERVICES_BASE / self.run_base.name

    def _db_relocated(self) -> bool:
        """As root, PostgreSQL runs as `postgres`, which cannot reach a state directory under,
        say, /root (mode 0700). Its files then live under /var/lib/haflow/db, linked from the
        state directory, so `haflow up` works wherever the user runs it."""
        if self._relocated is None:
            self._relocated = self._db_placed_outside()
            if self._relocated is None:
                user = default_db_user()
                # a new cluster's state directory becomes 0700 (StateDir.claim), whatever its
                # parent is now: decided before the directory exists, the answer must be the same
                new = not (self.state_dir / "nodes").exists()
                self._relocated = is_root() and user != "root" and (new or not reachable_by(self.state_dir, user))
        return self._relocated

    def _db_placed_outside(self) -> bool | None:
        """Where an existing cluster's database files already are (a link means outside):
        the decision is made once, when the cluster is created, and never moves data."""
        for link in sorted((self.state_dir / "nodes").glob(f"*/{DB_DIR}")):
            if link.is_symlink():
                return True
            if link.is_dir():
                return False
        return None

    def _db_base(self) -> Path:
        return DB_RELOCATION_BASE / self.run_base.name

    def _socket(self, node: str) -> Path:
        return self.layout(node).run / "supervisor.sock"

    # --- preflight ------------------------------------------------------------------------------
    def preflight(self, target: Target, listen: dict[tuple[str, int], str]) -> list[str]:
        """Why the target cannot start here: an address this machine lacks, or a port someone
        else holds. A target whose supervisor runs owns its ports and is not checked."""
        name = _key(target)
        if self.node_up(name):
            return []
        local = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs}
        absent = sorted({a for a, _ in listen if not ipaddress.ip_address(a).is_loopback and a not in local})
        if absent:
            return [f"{name}: address {a} is not on this machine; the local host runs every node here "
                    "(use 127.0.0.x addresses, or deploy to real hosts)" for a in absent]
        problems = []
        for (address, port), field in sorted(listen.items()):
            with socket.socket() as s:
                # as the servers do: TIME_WAIT leftovers of a just-stopped cluster are no clash
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((address, port))
                except OSError:
                    problems.append(f"{name}: {address}:{port} ({field}) is already in use{_holder(address, port)}; "
                                    f"stop that process or choose another {field}")
        return problems

    # --- provisioning ---------------------------------------------------------------------------
    def missing(self, machine: Machine, needs: Needs) -> list[str]:
        return [f"{p.what} (apt: {p.apt})" for p in local_provision.missing(needs)]

    def provision(self, machine: Machine, needs: Needs, say: Say) -> list[str]:
        """Distro packages (apt, as root), system users, runtime venvs; nothing on a re-run."""
        if self.services_run_as_root():
            say("this cluster was created by an older haflow: its services keep running as root (their data "
                "lives in the state directory); a cluster created now runs each service as its own user")
        return local_provision.provision(needs, say)

    # --- desired state --------------------------------------------------------------------------
    def plan(self, target: Target, desired: DesiredState, diff: bool = False) -> list[Change]:
        """What `apply` would change, without changing anything."""
        name = _key(target)
        layout = self.layout(name)
        dirs = [*self._base_dirs(layout), *desired.dirs]
        files = [*desired.files, self._supervisor_file(name, layout, desired.services)]
        return ([Change(name, d.path, what) for d in dirs if (what := _dir_change(d))]
                + [Change(name, f.path, what) for f in files if (what := _file_change(f))])

    def _base_dirs(self, layout: NodeLayout) -> list[Directory]:
        # Private to haflow, unless an older cluster's services still live (and run as root) in it
        # next to a database that `postgres` reaches through it.
        private = 0o755 if self.services_run_as_root() and not self._db_relocated() else 0o700
        base = [Directory(layout.root, private), Directory(layout.run, 0o755), Directory(layout.logs, 0o700)]
        if layout.services != layout.root:  # each service's own folder inside is 0700 and its user's
            base += [Directory(layout.services.parent, 0o755), Directory(layout.services, 0o755)]
        return base

    def _supervisor_file(self, name: str, layout: NodeLayout, services: list[Service]) -> File:
        return File(layout.root / "supervisord.conf", self._supervisor_conf(name, layout, services), 0o600)

    def apply(self, target: Target, desired: DesiredState) -> list[Path]:
        """Make files and directories as desired; render the target's supervisord config and
        record what its services fork. Returns the files that changed (none on a re-run)."""
        node = _key(target)
        layout = self.layout(node)
        for d in [*self._base_dirs(layout), *desired.dirs]:
            _ensure_dir(d)
        link = layout.root / DB_DIR
        if node != MACHINE and layout.db_root != link and not link.is_symlink():
            link.symlink_to(layout.db_root)
        changed = [f.path for f in desired.files if _ensure_file(f)]
        conf = self._supervisor_file(node, layout, desired.services)
        if _ensure_file(conf):
            changed.append(conf.path)
        self._record_services(node, desired.services)
        return changed

    def _record_services(self, name: str, services: list[Service]) -> None:
        record = {s.name: {"reload_signal": s.reload_signal,
                           "forks": {"pidfile": str(s.forks.pidfile), "marker": s.forks.marker,
                                     "stop_signal": s.forks.stop_signal} if s.forks else None}
                  for s in services}
        text = json.dumps(record, indent=1, sort_keys=True)
        path = self.layout(name).root / SERVICES_FILE
        if not path.exists() or path.read_text() != text:
            atomic_write(path, text, 0o600)

    def _services(self, name: str) -> dict[str, Any]:
        try:
            data = json.loads((self.layout(name).root / SERVICES_FILE).read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _forks(self, name: str) -> dict[str, dict[str, str]]:
        """Per service, the daemon it forks (Service.forks, as recorded at `apply`)."""
        return {service: rec["forks"] for service, rec in self._services(name).items() if (rec or {}).get("forks")}

    def _supervisor_conf(self, node: str, layout: NodeLayout, services: list[Service]) -> str:
        me = getpass.getuser()
        programs = [
            {
                "name": s.name,
                "command": _escape(shlex.join(s.argv)),
                "user": s.user if s.user and s.user != me else None,
                "cwd": s.cwd,
                "environment": ",".join(f'{k}="{_escape(v)}"' for k, v in s.env.items()),
                "stop_signal": s.stop_signal,
                "stop_timeout_s": s.stop_timeout_s,
            }
            for s in services
        ]
        return render_template(
            "supervisord.conf.j2",
            cluster=self.cluster,
            node=node,
            socket=self._socket(node),
            logs=layout.logs,
            run=layout.run,
            root=layout.root,
            services=programs,
        )

    # --- the node's supervisor (agent) ----------------------------------------------------------
    def _agent_file(self, node: str) -> Path:
        return self.layout(node).root / AGENT_FILE

    def agent(self, node: str) -> ProcRef | None:
        """The node's running supervisord, verified by PID and start time."""
        try:
            data = json.loads(self._agent_file(node).read_text())
            ref = ProcRef(int(data["pid"]), float(data["create_time"]), f"{node}/supervisord")
        except (OSError, ValueError, KeyError):
            return None
        return ref if ref.alive() else None

    def node_up(self, node: str) -> bool:
        return self.agent(node) is not None

    def running(self, target: Target) -> bool:
        """The target's init (its supervisord) runs."""
        return self.node_up(_key(target))

    def boot(self, target: Target) -> bool:
        """Start the target's supervisord if it is not running; True if it was started."""
        return self.ensure_agent(_key(target))

    def ensure_agent(self, node: str, timeout: float = 20.0) -> bool:
        """Start the node's supervisord if it is not running; True if it was started."""
        if self.agent(node):
            self._sync_programs(node)  # no-op unless supervisord.conf changed
            return False
        layout = self.layout(node)
        sock = self._socket(node)
        sock.unlink(missing_ok=True)  # left by a killed supervisord; it refuses to start otherwise
        log = open(layout.logs / "supervisord.out", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor.supervisord", "-c", str(layout.root / "supervisord.conf")],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            cwd=layout.root,
        )
        log.close()
        ref = ProcRef.of(proc.pid, f"{node}/supervisord")
        if ref is None:
            raise HaflowError(f"{node}: supervisord exited at once; see {layout.logs / 'supervisord.out'}")
        self._agent_file(node).write_text(json.dumps({"pid": ref.pid, "create_time": ref.create_time}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise HaflowError(f"{node}: supervisord exited with {proc.returncode}; see {layout.logs / 'supervisord.out'}")
            try:
                if self._rpc(node).supervisor.getState()["statename"] == "RUNNING":
                    return True
            except (OSError, xmlrpc.client.Error):
                pass
            time.sleep(0.1)
        raise HaflowError(f"{node}: supervisord did not answer within {timeout:.0f}s; see {layout.logs / 'supervisord.log'}")

    def _rpc(self, node: str) -> Any:
        transport = SupervisorTransport(None, None, serverurl=f"unix://{self._socket(node)}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def _sync_programs(self, node: str) -> None:
        """Apply a changed supervisord.conf: add new programs, drop removed ones, and take the new
        definition of changed ones that are not running. A changed program that runs keeps
        running on its old definition until orchestration restarts it (`stale_services`), one
        node at a time: a config change must never stop a service on every node at once."""
        rpc = self._rpc(node)
        added, changed, removed = rpc.supervisor.reloadConfig()[0]
        for name in removed:
            try:
                rpc.supervisor.stopProcessGroup(name)
            except xmlrpc.client.Fault:
                pass
            rpc.supervisor.removeProcessGroup(name)
        for name in changed:
            if not self.service_running(node, name):
                self._replace_program(node, name)
        for name in added:
            rpc.supervisor.addProcessGroup(name)

    def _replace_program(self, node: str, name: str) -> None:
        rpc = self._rpc(node)
        try:  # a program retrying a failed start (BACKOFF) is not running, but must stop first
            rpc.supervisor.stopProcess(name, True)
        except xmlrpc.client.Fault as e:
            if "NOT_RUNNING" not in e.faultString:
                raise
        rpc.supervisor.removeProcessGroup(name)
        rpc.supervisor.addProcessGroup(name)

    def stale(self, target: Target) -> list[str]:
        return self.stale_services(_key(target))

    def stale_services(self, node: str) -> list[str]:
        """Running services whose definition (argv, env, user) changed since they started."""
        if not self.agent(node):
            return []
        try:
            return list(self._rpc(node).supervisor.reloadConfig()[0][1])
        except (OSError, xmlrpc.client.Error):
            return []

    def stop_agent(self, node: str, timeout: float = 30.0) -> None:
        agent = self.agent(node)
        if agent is None:
            return
        try:
            self._rpc(node).supervisor.shutdown()
        except (OSError, xmlrpc.client.Error):
            agent.send(signal.SIGTERM)
        if wait_gone([agent], timeout):
            agent.send(signal.SIGKILL)
            wait_gone([agent], 5)

    # --- services ------------------------------------------------------------------------------
    def service_info(self, node: str, service: str) -> dict[str, Any] | None:
        if not self.agent(node):
            return None
        try:
            return self._rpc(node).supervisor.getProcessInfo(service)
        except (OSError, xmlrpc.client.Error):
            return None

    def service_running(self, node: str, service: str) -> bool:
        info = self.service_info(node, service)
        return bool(info) and info["statename"] in RUNNING_STATES

    def start(self, target: Target, service: str) -> bool:
        """Start a service unless it runs; True if it was started."""
        node = _key(target)
        if self.service_running(node, service):
            return False
        try:
            self._rpc(node).supervisor.startProcess(service, True)
        except xmlrpc.client.Fault as e:
            if "ALREADY_STARTED" in e.faultString:
                return False
            log = self.layout(node).logs / f"{service}.log"
            raise HaflowError(f"{node}: {service} failed to start ({e.faultString}); see {log}") from None
        return True

    def stop(self, target: Target, service: str) -> None:
        """Stop the service, then what it forked if that outlived it (a daemon its supervisor
        does not see; systemd's control group would catch it the same way)."""
        node = _key(target)
        if self.agent(node):
            try:
                self._rpc(node).supervisor.stopProcess(service, True)
            except xmlrpc.client.Fault as e:
                if "NOT_RUNNING" not in e.faultString and "BAD_NAME" not in e.faultString:
                    raise HaflowError(f"{node}: could not stop {service}: {e.faultString}") from None
        _stop_forked(node, service, self._forks(node).get(service))

    def reload(self, target: Target, service: str) -> bool:
        """Send the service its reload signal; False when it has none or is not running."""
        node = _key(target)
        sig = (self._services(node).get(service) or {}).get("reload_signal")
        ref = self.service_proc(node, service)
        return bool(sig and ref and ref.send(getattr(signal, f"SIG{sig}")))

    def instance(self, target: Target, service: str) -> Instance | None:
        ref = self.service_proc(_key(target), service)
        return Instance(_key(target), service, f"{ref.pid}@{ref.create_time:.2f}") if ref else None

    def restart(self, target: Target, service: str) -> None:
        """Stop, take the service's current definition, start."""
        node = _key(target)
        stale = service in self.stale_services(node)
        self.stop(node, service)
        if stale:
            self._replace_program(node, service)
        self.start(node, service)

    def service_proc(self, node: str, service: str) -> ProcRef | None:
        info = self.service_info(node, service)
        if not info or not info.get("pid"):
            return None
        ref = ProcRef(info["pid"], float(info["start"]), f"{node}/{service}")
        # supervisord's start is the spawn time in whole seconds; trust the live process's own
        # start time once it matches within that slack.
        live = ProcRef.of(info["pid"], ref.label)
        # alive(): a killed service that supervisord has not reaped yet is a zombie, not running
        return live if live and abs(live.create_time - ref.create_time) <= 2 and live.alive() else None

    def changed_since_start(self, target: Target, service: str, paths: tuple[Path, ...]) -> bool:
        """Whether one of `paths` was written after the running service started."""
        ref = self.service_proc(_key(target), service)
        if ref is None:
            return False
        return any(p.exists() and p.stat().st_mtime > ref.create_time for p in paths)

    # --- one-shot commands and folders ----------------------------------------------------------
    def run(self, node: str, argv: list[str], env: dict[str, str], timeout: float = 600,
            user: str | None = None, cwd: Path | None = None) -> tuple[int, str]:
        """Run a command on the node (here: this machine) as `user` (None: haflow's own) and
        wait; returns (exit code, output)."""
        uid, gid = _ids(user) or (None, None)
        try:
            r = subprocess.run(argv, env=env, cwd=cwd or self.layout(node).root, capture_output=True, text=True,
                               timeout=timeout, user=uid, group=gid, extra_groups=None if uid is None else [])
        except subprocess.TimeoutExpired:
            return 124, f"timed out after {timeout:.0f}s"
        return r.returncode, (r.stdout + r.stderr)

    def put_tree(self, node: str, source: Path, checksum: str, dest: Path, owner: str | None = None) -> bool:
        """Make `dest` an exact copy of `source` (whose `fsutil.tree_checksum` the caller
        computed once for every node) owned by `owner`, switched atomically: `dest` is a link to
        a folder named after the checksum (a reader sees the old tree or the new one, never a
        half-copied one). True if anything changed."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        return self.sync_folder(node, source, dest, checksum[:12], owner)

    def tree_checksum(self, node: str, dest: Path) -> str | None:
        return tree_checksum(dest) if dest.is_dir() else None

    def sync_folder(self, node: str, source: Path, link: Path, version: str, owner: str | None = None) -> bool:
        target = link.parent / f"{link.name}.{version}"
        if link.is_symlink() and os.readlink(link) == target.name and target.is_dir():
            return False
        if not target.is_dir():
            tmp = link.parent / f".{target.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            # symlinks stay links: a link to /etc must not copy /etc onto every node
            shutil.copytree(source, tmp, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            _chown_tree(tmp, owner)
            os.replace(tmp, target)
        new_link = link.parent / f".{link.name}.link"
        new_link.unlink(missing_ok=True)
        new_link.symlink_to(target.name)
        _chown_tree(new_link, owner)
        if link.exists() and not link.is_symlink():
            shutil.rmtree(link)  # a plain folder from an earlier layout
        os.replace(new_link, link)
        for old in link.parent.glob(f"{link.name}.*"):
            if old != target and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
        return True

    # --- processes and faults ------------------------------------------------------------------
    def processes(self, node: str) -> list[ProcRef]:
        """Every live process of the node: supervisord, its services and their children, and
        what its services forked."""
        node = _key(node)
        refs: list[ProcRef] = []
        agent = self.agent(node)
        if agent:
            refs.append(agent)
            refs += agent.descendants()
        for service, forks in self._forks(node).items():
            forked = _forked(node, service, forks)
            if forked:
                refs += [forked, *forked.descendants()]
        seen: set[int] = set()
        return [r for r in refs if not (r.pid in seen or seen.add(r.pid))]

    def kill_service(self, node: str, service: str) -> list[Instance]:
        """A crash of one service: SIGKILL its process group (supervisord made each program a
        group leader, so a wrapper script and the real server die together), every other
        descendant and what it forked. Its supervisor restarts it, as systemd would."""
        ref = self.service_proc(node, service)
        if ref is None:
            raise HaflowError(f"{node}: {service} is not running")
        killed = self.instance(node, service)
        forks = self._forks(node).get(service)
        forked = _forked(node, service, forks) if forks else None
        _kill_tree(ref, *([forked] if forked else []))
        return [killed] if killed else []

    def kill_node(self, target: Target) -> int:
        """Machine loss: SIGKILL every process of the target at once. Its supervisord dies first,
        so nothing restarts; it stays down until `boot`. Returns how many processes died."""
        node = _key(target)
        refs = self.processes(node)
        agent = self.agent(node)
        if agent:
            agent.send(signal.SIGKILL)
        for r in refs:
            r.kill_group(signal.SIGKILL) if r.label.endswith("forked") else r.send(signal.SIGKILL)
        left = wait_gone(refs, 10)
        if left:
            raise HaflowError(f"{node}: processes survived SIGKILL: {[r.pid for r in left]}")
        return len(refs)

    def stop_node(self, target: Target) -> None:
        """Stop the target's supervisord (it stops what still runs); `leftovers` then tells
        whether anything it ran outlived it."""
        node = _key(target)
        self._stopped[node] = self.processes(node)
        self.stop_agent(node)
        for service, forks in self._forks(node).items():
            _stop_forked(node, service, forks)

    def leftovers(self, target: Target, timeout: float = 10.0) -> list[str]:
        """Processes of the target still alive (after `stop_node`: waited for up to `timeout`)."""
        node = _key(target)
        refs = {r.pid: r for r in [*self._stopped.get(node, []), *self.processes(node)]}
        return [f"{r.label}[{r.pid}]" for r in wait_gone(list(refs.values()), timeout)]

    def purge_node(self, node: str) -> None:
        """The node's own folders: config, data, logs, sockets (the shared task logs stay)."""
        layout = self.layout(node)
        for path in (layout.db_root, layout.services, layout.root, layout.run):
            shutil.rmtree(path, ignore_errors=True)

    def purge(self) -> None:
        shutil.rmtree(self.state_dir, ignore_errors=True)
        shutil.rmtree(self._db_base(), ignore_errors=True)
        shutil.rmtree(self._services_base(), ignore_errors=True)
        shutil.rmtree(self.run_base, ignore_errors=True)


# --- filesystem helpers ------------------------------------------------------------------------


def _kill_tree(*roots: ProcRef) -> list[ProcRef]:
    """SIGKILL each root's group and every descendant (some leave the group); wait until gone."""
    refs = [r for root in roots for r in (root, *root.descendants())]
    for root in roots:
        root.kill_group(signal.SIGKILL)
    for r in refs:
        r.send(signal.SIGKILL)
    wait_gone(refs, 10)
    return refs


def _forked(node: str, service: str, forks: dict[str, str]) -> ProcRef | None:
    """The live daemon a service forked (Service.forks), found by its pid file and checked to
    be the one serving this node (its command line carries the recorded marker)."""
    try:
        pid = int(Path(forks["pidfile"]).read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None
    ref = ProcRef.of(pid, f"{node}/{service} forked")
    if ref is None or (p := ref.process()) is None:
        return None
    try:
        if forks["marker"] not in " ".join(p.cmdline()):
            return None
    except psutil.Error:
        return None
    return ref


def _stop_forked(node: str, service: str, forks: dict[str, str] | None, timeout: float = 30.0) -> None:
    """What the service forked, if it outlived the service: its stop signal, then SIGKILL."""
    forked = _forked(node, service, forks) if forks else None
    if forked is None:
        return
    forked.send(getattr(signal, f"SIG{forks['stop_signal']}"))
    if wait_gone([forked], timeout):
        forked.kill_group(signal.SIGKILL)
        wait_gone([forked], 5)


def _key(target: Target) -> str:
    """The folder a target's supervisor lives in: the node's, or the machine's own."""
    return MACHINE if isinstance(target, Machine) else target


def _dir_change(d: Directory) -> str | None:
    if not d.path.is_dir():
        return "create"
    st = d.path.stat()
    if stat.S_IMODE(st.st_mode) != d.mode:
        return "mode"
    ids = _ids(d.owner)
    return "owner" if ids and (st.st_uid, st.st_gid) != ids else None


def _file_change(f: File) -> str | None:
    try:
        st = f.path.stat()
        if f.path.read_text() != f.content:
            return "update"
    except FileNotFoundError:
        return "create"
    if stat.S_IMODE(st.st_mode) != f.mode:
        return "mode"
    ids = _ids(f.owner)
    return "owner" if ids and (st.st_uid, st.st_gid) != ids else None


def _ids(owner: str | None) -> tuple[int, int] | None:
    if owner is None or not is_root():
        return None
    try:
        pw = pwd.getpwnam(owner)
    except KeyError:
        raise UserError(f"user {owner!r} does not exist; install its package (postgresql creates 'postgres')") from None
    return pw.pw_uid, pw.pw_gid


def _chown_tree(root: Path, owner: str | None) -> None:
    """Give a copied tree to its service user and its group, readable by the group, closed to
    others (links themselves are changed, never what they point at)."""
    ids = _ids(owner)
    if ids is None:
        return
    inside = [] if root.is_symlink() else [Path(d) / n for d, dirs, files in os.walk(root) for n in [*dirs, *files]]
    for path in [root, *inside]:
        os.lchown(path, *ids)
        if not path.is_symlink():
            mode = stat.S_IMODE(path.stat().st_mode)
            group = stat.S_IRGRP | (stat.S_IXGRP if path.is_dir() or mode & stat.S_IXUSR else 0)
            os.chmod(path, (mode | group) & ~0o007)


def _open_to_group(root: Path) -> None:
    """Folders below `root` group-writable (setgid, so new entries keep the group), files
    group-readable and -writable; links untouched."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, stat.S_IMODE(os.stat(p).st_mode) | stat.S_ISGID | stat.S_IRWXG)
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, stat.S_IMODE(os.stat(p).st_mode) | stat.S_IRGRP | stat.S_IWGRP)


def _ensure_dir(d: Directory) -> bool:
    changed = False
    if not d.path.is_dir():
        d.path.mkdir(parents=True, exist_ok=True)
        changed = True
    st = d.path.stat()
    if stat.S_IMODE(st.st_mode) != d.mode:
        os.chmod(d.path, d.mode)
        if d.group_tree:
            _open_to_group(d.path)
        changed = True
    ids = _ids(d.owner)
    if ids and (st.st_uid, st.st_gid) != ids:
        os.chown(d.path, *ids)
        changed = True
    return changed


def _ensure_file(f: File) -> bool:
    """Write the file if its content, mode or owner differ (`_file_change`); True if it did."""
    if _file_change(f) is None:
        return False
    ids = _ids(f.owner)
    f.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.path.with_name(f".{f.path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, f.mode)
    with os.fdopen(fd, "w") as out:
        out.write(f.content)
    os.chmod(tmp, f.mode)
    if ids:
        os.chown(tmp, *ids)
    os.replace(tmp, f.path)
    return True


def _holder(address: str, port: int) -> str:
    """' by PID (name)' of the listener, when the kernel tells us."""
    try:
        for c in psutil.net_connections("tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.laddr.ip in (address, "0.0.0.0", "::") and c.pid:
                name = psutil.Process(c.pid).name()
                hint = {
                    "epmd": " (an epmd daemonized by an Erlang tool or the distro's epmd.socket; `epmd -kill` stops it)",
                    "beam.smp": " (the distro's rabbitmq-server service? `systemctl disable --now rabbitmq-server`)",
                }.get(name, "")
                return f" by pid {c.pid} ({name}){hint}"
    except psutil.Error:
        pass
    return ""


def _escape(value: str) -> str:
    """supervisord expands %(name)s in its config: a literal % must be doubled."""
    return str(value).replace("%", "%%")
