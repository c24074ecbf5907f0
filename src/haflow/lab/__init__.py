"""The lab: disposable Debian hosts with systemd and sshd on this machine, for the SSH path.

`Lab.up` builds (once) the release's base image, brings up the private network (net.py), gives
every host its identity and boots it (machines.py), waits until each answers over SSH with a
running systemd, and writes an SSH key, a known_hosts file and a ready spec for the hosts.
`Lab.down` stops and deletes the hosts, removes the network and verifies nothing is left; it
can be re-run. The verbs the drills need: `poweroff`, `start`, `isolate`, `heal`.

Everything lives under LAB_DIR (root only, 0700); the base images stay cached there.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import asyncssh
import yaml

from haflow.errors import HaflowError, UserError
from haflow.fsutil import atomic_write
from haflow.lab import balancer as lab_balancer
from haflow.lab import image, net
from haflow.hosts.procs import ProcRef, wait_gone
from haflow.lab.machines import LabHost

LAB_DIR = Path(os.environ.get("HAFLOW_LAB_DIR", "/var/lib/haflow/lab"))
RECORD = "lab.json"
KEY = "lab_ed25519"
KNOWN_HOSTS = "known_hosts"
SPEC = "cluster.yaml"
STATE = ".haflow"  # the state directory of `haflow deploy -f cluster.yaml` (next to the spec)
NODE_COUNTS = (3, 5)
READY_TIMEOUT_S = 90
TOOLS = {"systemd-nspawn": "systemd-container", "debootstrap": "debootstrap", "nft": "nftables", "ssh-keygen": "openssh-client"}

Say = Callable[[str], None]


SPARE_ADDRESS_INDEX = 30  # spare1 is 10.213.0.41: clear of the nodes (.11-.15) and the balancer (.60)
MAX_SPARES = 2


class Lab:
    def __init__(self, root: Path = LAB_DIR, say: Say = lambda _: None) -> None:
        self.root = root
        self.run = root / "run"
        self.cache = root / "cache"
        self.say = say

    # --- the record -------------------------------------------------------------------------------
    def record(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.run / RECORD).read_text())
        except (OSError, ValueError):
            return None

    def hosts(self, role: str | None = None) -> list[LabHost]:
        """The lab's hosts (with `role`: only the nodes, the balancer or the spares)."""
        rec = self.record() or {"hosts": []}
        return [LabHost(self.root, h["name"], h["address"]) for h in rec["hosts"]
                if role is None or h.get("role", "node") == role]

    def host(self, name: str) -> LabHost:
        for h in self.hosts():
            if h.name == name:
                return h
        known = ", ".join(h.name for h in self.hosts()) or "none (run `haflow lab up`)"
        raise UserError(f"no lab host {name!r}; lab hosts: {known}")

    # --- up -----------------------------------------------------------------------------------------
    def up(self, nodes: int = 3, release: str = image.DEFAULT_RELEASE, balancer: bool = False,
           spares: int = 0) -> dict[str, Any]:
        """Bring the lab up (idempotent: a running lab of the same shape is left as it is; a
        balancer host or spare hosts asked for later are added). Spare hosts (`spare1`, ...) are
        booted but left out of the spec: servers to add to the cluster (a worker-only node)."""
        t0 = time.monotonic()
        check_can_run(install=True, say=self.say)
        if nodes not in NODE_COUNTS:
            raise UserError(f"--nodes {nodes}: the lab has 3 or 5 hosts")
        if not 0 <= spares <= MAX_SPARES:
            raise UserError(f"--spares {spares}: the lab has 0-{MAX_SPARES} spare hosts")
        if release not in image.RELEASES:
            raise UserError(f"--release {release}: choose one of {', '.join(image.RELEASES)}")
        rec = self.record()
        have = [h for h in rec["hosts"] if h.get("role", "node") == "node"] if rec else []
        if rec and (len(have) != nodes or rec["release"] != release):
            raise UserError(f"the lab already has {len(have)} {rec['release']} hosts; "
                            "`haflow lab down` first to change its size or release")
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.run.mkdir(exist_ok=True)
        base = image.ensure_base(self.cache, release, self.say)
        key = self._ensure_key()
        wanted = [{"name": f"lab{i}", "address": net.host_address(i), "role": "node"} for i in range(1, nodes + 1)]
        if balancer or (rec and any(h.get("role") == "balancer" for h in rec["hosts"])):
            wanted.append({"name": lab_balancer.NAME, "address": net.host_address(lab_balancer.ADDRESS_INDEX),
                           "role": "balancer"})
        had_spares = len([h for h in rec["hosts"] if h.get("role") == "spare"]) if rec else 0
        wanted += [{"name": f"spare{i}", "address": net.host_address(SPARE_ADDRESS_INDEX + i), "role": "spare"}
                   for i in range(1, max(spares, had_spares) + 1)]
        if rec is None or len(rec["hosts"]) != len(wanted):
            atomic_write(self.run / RECORD, json.dumps({"release": release, "hosts": wanted}, indent=1), 0o600)
        self.say("bringing up the lab network")
        net.up(self.run)
        self._create_missing(base, key)
        self.say(f"booting {nodes} {release} hosts")
        for h in self.hosts():
            h.start(base)
        asyncio.run(self._wait_ready())
        self._write_spec()
        if self.hosts("balancer"):
            self.say("configuring the stand-in balancer from `haflow lb settings`")
            self._configure_balancer()
        return {**self.status(), "elapsed_s": round(time.monotonic() - t0, 1)}

    def _configure_balancer(self) -> None:
        from haflow import lb
        from haflow.facts import ClusterFacts
        from haflow.spec import load_spec

        settings = lb.settings(ClusterFacts(load_spec(self.run / SPEC)))
        script = lab_balancer.install_script(lab_balancer.haproxy_config(settings))
        for h in self.hosts("balancer"):
            asyncio.run(self.run_on(h.name, script, timeout=600, check=True))

    def _ensure_key(self) -> str:
        key = self.run / KEY
        if not key.exists():
            r = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "haflow-lab", "-f", str(key)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise HaflowError(f"could not make the lab's SSH key: {r.stderr.strip()}")
        return (self.run / f"{KEY}.pub").read_text()

    def _create_missing(self, base: Path, key: str) -> None:
        """Hosts without a layer get one; known_hosts lists every host's key (strict checking)."""
        everyone = [(h.name, h.address) for h in self.hosts()]
        known = self.run / KNOWN_HOSTS
        lines = {line.split(",", 1)[0]: line for line in (known.read_text().splitlines() if known.exists() else [])}
        for h in self.hosts():
            if not (h.upper / "etc/ssh/ssh_host_ed25519_key.pub").exists() or h.address not in lines:
                lines[h.address] = h.create(base, key, everyone)
        atomic_write(known, "".join(lines[h.address] + "\n" for h in self.hosts()), 0o600)

    async def _wait_ready(self) -> None:
        results = await asyncio.gather(*(self._ready(h) for h in self.hosts()), return_exceptions=True)
        bad = [f"{h.name}: {r}" for h, r in zip(self.hosts(), results) if isinstance(r, Exception)]
        if bad:
            raise HaflowError(f"lab hosts not ready: {'; '.join(bad)}; see {self.root}/hosts/NAME/console.log")

    async def _ready(self, h: LabHost) -> None:
        """Until the host answers over SSH and systemd reports running (or degraded)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                out = await self.run_on(h.name, "systemctl is-system-running", timeout=5)
                if out.strip() in ("running", "degraded"):
                    return
                last = f"systemd is {out.strip()}"
            except (OSError, asyncssh.Error, asyncio.TimeoutError) as e:
                last = f"{type(e).__name__}: {e}"
            await asyncio.sleep(0.2)
        raise HaflowError(f"not ready within {READY_TIMEOUT_S}s ({last})")

    async def run_on(self, name: str, command: str, timeout: float = 30, check: bool = False) -> str:
        """Run a command on a lab host over SSH as root (strict host key checking); its output
        (with `check`: HaflowError with its error output when it fails)."""
        h = self.host(name)
        net.check_route(h.address)  # never a lab packet out of the machine
        async with asyncssh.connect(h.address, username="root", client_keys=[str(self.run / KEY)],
                                    known_hosts=str(self.run / KNOWN_HOSTS), connect_timeout=timeout) as conn:
            r = await asyncio.wait_for(conn.run(command, check=False), timeout)
            if check and r.exit_status != 0:
                raise HaflowError(f"{name}: a lab step failed (exit {r.exit_status}): {str(r.stderr or r.stdout).strip()[-400:]}")
            return str(r.stdout or "")

    def _write_spec(self) -> None:
        from haflow.spec import default_spec_text

        data = yaml.safe_load(default_spec_text())
        data["cluster"] = "lab"
        data["nodes"] = [{"name": h.name, "address": h.address,
                          "ssh": {"user": "root", "key": str(self.run / KEY), "known_hosts": str(self.run / KNOWN_HOSTS)},
                          "control": control_commands(h.name)}
                         for h in self.hosts("node")]
        data["etcd"]["members"] = [h.name for h in self.hosts("node")]
        # the lab's tasks run seconds: a worker's warm shutdown (as long as a task may run) is
        # bounded at 5 minutes rather than 10, so a stuck one cannot hold a test run up as long
        data["airflow"]["task_execution_timeout_s"] = 300
        # the stand-in balancer proxies: PostgreSQL sees its address, so admit it
        data["database"]["allowed_clients"] = [f"{h.address}/32" for h in self.hosts("balancer")]
        atomic_write(self.run / SPEC, "# written by `haflow lab up`: the lab's hosts\n" + yaml.safe_dump(data, sort_keys=False), 0o600)

    # --- status and faults ------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        rec = self.record()
        return {
            "up": rec is not None,
            "release": rec["release"] if rec else None,
            "hosts": [{"name": h["name"], "address": h["address"], "role": h.get("role", "node"),
                       "running": LabHost(self.root, h["name"], h["address"]).running()} for h in (rec or {"hosts": []})["hosts"]],
            "key": str(self.run / KEY) if rec else None,
            "known_hosts": str(self.run / KNOWN_HOSTS) if rec else None,
            "spec": str(self.run / SPEC) if rec and (self.run / SPEC).exists() else None,
            "network": {"bridge": net.BRIDGE, "subnet": str(net.SUBNET)} if rec else None,
        }

    def poweroff(self, name: str) -> None:
        check_can_run()
        self.host(name).poweroff()

    def start(self, name: str) -> None:
        check_can_run()
        rec = self.record() or {}
        self.host(name).start(image.base_dir(self.cache, rec.get("release", image.DEFAULT_RELEASE)))

    def isolate(self, name: str, ports: str | None = None) -> None:
        """Cut a host off; with `ports` (e.g. "4369,25672-25674"), only TCP on those ports
        between it and the other hosts."""
        cut = net.parse_ports(ports) if ports else None  # bad input: exit 2 before anything
        check_can_run()
        net.isolate(self.host(name).veth, cut)

    def heal(self) -> None:
        check_can_run()
        net.heal()

    # --- down ---------------------------------------------------------------------------------------
    def down(self) -> dict[str, Any]:
        """Stop and delete every host, remove the network; verify nothing is left (re-runnable)."""
        check_can_run()
        t0 = time.monotonic()
        hosts = self.hosts() or [LabHost(self.root, d.name, "") for d in (self.root / "hosts").glob("*") if d.is_dir()]
        refs = [r for h in hosts for r in h.refs()]
        for h in hosts:
            h.destroy()
        net.down(self.run)
        for name in (RECORD, SPEC, KNOWN_HOSTS):
            (self.run / name).unlink(missing_ok=True)
        # the state of a cluster deployed with the lab's spec (secrets, records): its servers are
        # gone, so a record kept here would describe a cluster that no longer exists
        shutil.rmtree(self.run / STATE, ignore_errors=True)
        left = self.leftovers(hosts, refs)
        if left:
            raise HaflowError(f"the lab is not fully gone: {', '.join(left)}; re-run `haflow lab down`")
        return {"removed_hosts": [h.name for h in hosts], "elapsed_s": round(time.monotonic() - t0, 1)}

    def leftovers(self, hosts: list[LabHost], refs: list[ProcRef] = ()) -> list[str]:
        """What of the lab still exists: host processes (`refs`, taken before they were
        stopped), host folders, mounts, and the network's bridge, routes and tables."""
        left = net.leftovers()
        left += [f"{r.label}[{r.pid}]" for r in wait_gone(list(refs), 5)]
        left += [f"folder {h.dir}" for h in hosts if h.dir.exists()]
        left += [f"cluster state {self.run / STATE}"] if (self.run / STATE).exists() else []
        mounts = Path("/proc/mounts").read_text()
        left += [f"mount {line.split()[1]}" for line in mounts.splitlines() if str(self.root) in line]
        return left


def control_commands(name: str) -> dict[str, list[str]]:
    """The spec's `nodes[].control` for a lab host: this haflow's own lab verbs (the drills run
    them to power the host off and on and to cut it off the network)."""
    haflow = [sys.executable, "-m", "haflow.cli", "lab"]
    return {"power_off": [*haflow, "poweroff", name], "power_on": [*haflow, "start", name],
            "isolate": [*haflow, "isolate", name], "isolate_broker": [*haflow, "isolate", name, "--ports", "{ports}"],
            "heal": [*haflow, "heal"]}


def check_can_run(install: bool = False, say: Say = lambda _: None) -> None:
    """Root, and the tools (installed with apt when asked; exit 2 with the fix otherwise)."""
    if os.geteuid() != 0:
        raise UserError("the lab needs root (it creates a bridge, nft tables and containers); run it with sudo")
    from haflow.components.base import Needs, Package
    from haflow.hosts import local_provision

    needs = Needs(packages=tuple(Package(pkg, tool, commands=(tool,)) for tool, pkg in TOOLS.items()))
    if install:
        local_provision.ensure_packages(needs, say)
        return
    missing = local_provision.missing(needs)
    if missing:
        names = " ".join(p.apt for p in missing)
        raise UserError(f"the lab needs {names}; install with: apt-get install -y {names}")
