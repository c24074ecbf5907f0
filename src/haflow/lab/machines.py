"""One lab host: a Debian that boots systemd under systemd-nspawn, on its own overlay layer.

The host's layer (`hosts/NAME/upper`) holds only its identity (hostname, /etc/hosts, machine-id,
its address, fresh SSH host keys, the lab key) and whatever it writes later; the base image is
its read-only lower layer. nspawn and the host's init are tracked by PID + start time.

Power-off is SIGKILL of the host's init: the kernel kills its whole PID namespace at once, as a
power cut would (the page cache survives: unsynced writes are not lost as on real hardware).
SIGKILL of nspawn is not a power-off (the container keeps running, orphaned) and is never used.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import psutil

from haflow.errors import HaflowError
from haflow.fsutil import atomic_write
from haflow.hosts.procs import ProcRef, wait_gone
from haflow.lab import net

RECORD = "host.json"


class LabHost:
    def __init__(self, lab_dir: Path, name: str, address: str) -> None:
        self.name = name
        self.address = address
        self.dir = lab_dir / "hosts" / name
        self.upper = self.dir / "upper"
        self.veth = f"vb-{name}"  # nspawn's host side of the host's link (names stay <= 15 chars)

    # --- identity ---------------------------------------------------------------------------------
    def create(self, base: Path, authorized_key: str, everyone: list[tuple[str, str]]) -> str:
        """Write the host's identity into a new layer; returns its known_hosts line."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.upper.mkdir(parents=True)
        os.chmod(self.dir, 0o700)
        os.chmod(self.upper, 0o755)
        hosts = "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n"
        hosts += "".join(f"{address} {name}\n" for name, address in everyone)  # no 127.0.1.1 NAME line
        network = (f"[Match]\nName=host0\n\n[Network]\nAddress={self.address}/{net.SUBNET.prefixlen}\n"
                   f"Gateway={net.GATEWAY}\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n")
        self._put(base, "etc/hostname", f"{self.name}\n")
        self._put(base, "etc/hosts", hosts)
        self._put(base, "etc/machine-id", uuid.uuid4().hex + "\n")
        self._put(base, "etc/systemd/network/10-host0.network", network)
        self._put(base, "root/.ssh/authorized_keys", authorized_key.strip() + "\n", mode=0o600, dir_mode=0o700)
        self._mkdir_like(base, "etc/ssh")
        r = subprocess.run(["ssh-keygen", "-q", "-A", "-f", str(self.upper)], capture_output=True, text=True)
        if r.returncode != 0:
            raise HaflowError(f"{self.name}: could not make SSH host keys: {r.stderr.strip()}")
        kind, key = (self.upper / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()[:2]
        return f"{self.address},{self.name} {kind} {key}"

    def _mkdir_like(self, base: Path, rel: str, mode: int | None = None) -> None:
        """Create the layer's folders with the base's owner and mode: a folder made in an upper
        layer defines the merged folder's owner and mode."""
        path = Path()
        for part in Path(rel).parts:
            path /= part
            target = self.upper / path
            if target.is_dir():
                continue
            target.mkdir()
            src = base / path
            if src.is_dir():
                st = src.stat()
                os.chmod(target, st.st_mode & 0o7777)
                os.chown(target, st.st_uid, st.st_gid)
            elif mode is not None:
                os.chmod(target, mode)

    def _put(self, base: Path, rel: str, content: str, mode: int = 0o644, dir_mode: int | None = None) -> None:
        self._mkdir_like(base, str(Path(rel).parent), dir_mode)
        atomic_write(self.upper / rel, content, mode)

    # --- processes ------------------------------------------------------------------------------
    def _record(self) -> dict:
        try:
            return json.loads((self.dir / RECORD).read_text())
        except (OSError, ValueError):
            return {}

    def _ref(self, key: str) -> ProcRef | None:
        data = self._record().get(key)
        if not data:
            return None
        ref = ProcRef(int(data[0]), float(data[1]), f"{self.name}/{key}")
        return ref if ref.alive() else None

    def init(self) -> ProcRef | None:
        return self._ref("init")

    def nspawn(self) -> ProcRef | None:
        return self._ref("nspawn")

    def running(self) -> bool:
        return self.init() is not None

    def start(self, base: Path, timeout: float = 15.0) -> None:
        """Boot the host (nothing when it runs); returns once its init runs."""
        if self.running():
            return
        for stale in self.dir.glob(".#upper*"):  # the overlay workdir a killed host left
            shutil.rmtree(stale, ignore_errors=True)
        argv = ["systemd-nspawn", "--boot", "-D", str(base), f"--overlay={base}:{self.upper}:/",
                f"--machine={self.name}", f"--network-bridge={net.BRIDGE}", "--resolv-conf=off",
                "--link-journal=no", "--register=no", "--keep-unit", "--console=read-only"]
        with open(self.dir / "console.log", "ab") as console:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                                    start_new_session=True, close_fds=True)
        nspawn = ProcRef.of(proc.pid, f"{self.name}/nspawn")
        if nspawn is None or psutil.Process(proc.pid).name() != "systemd-nspawn":
            raise HaflowError(f"{self.name}: systemd-nspawn exited at once; see {self.dir / 'console.log'}")
        init = self._wait_init(proc, nspawn, timeout)
        atomic_write(self.dir / RECORD, json.dumps({"nspawn": [nspawn.pid, nspawn.create_time],
                                                    "init": [init.pid, init.create_time]}), 0o600)

    def _wait_init(self, proc: subprocess.Popen, nspawn: ProcRef, timeout: float) -> ProcRef:
        """The host's init: nspawn's child named systemd in another PID namespace (nspawn's
        short-lived helpers come first and must not be taken for it)."""
        own_ns = os.readlink(f"/proc/{nspawn.pid}/ns/pid")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise HaflowError(f"{self.name}: systemd-nspawn exited ({proc.returncode}); see {self.dir / 'console.log'}")
            for child in psutil.Process(nspawn.pid).children():
                try:
                    if child.name() == "systemd" and os.readlink(f"/proc/{child.pid}/ns/pid") != own_ns:
                        ref = ProcRef.of(child.pid, f"{self.name}/init")
                        if ref:
                            return ref
                except (psutil.Error, OSError):
                    continue
            time.sleep(0.05)
        raise HaflowError(f"{self.name}: its init did not start within {timeout:.0f}s; see {self.dir / 'console.log'}")

    def poweroff(self) -> None:
        """Hard power-off: SIGKILL the host's init; every process of the host dies with it."""
        init, nspawn = self.init(), self.nspawn()
        if init:
            init.send(signal.SIGKILL)
        left = wait_gone([r for r in (init, nspawn) if r], 10)
        if left:
            raise HaflowError(f"{self.name}: still running after power-off: {[r.label for r in left]}")

    def stop(self, timeout: float = 30.0) -> None:
        """Orderly shutdown (nspawn passes SIGTERM on as a poweroff request), else power-off."""
        nspawn = self.nspawn()
        if nspawn is None:
            if self.running():
                self.poweroff()  # an orphaned host: its nspawn died, its init did not
            return
        nspawn.send(signal.SIGTERM)
        if wait_gone([nspawn], timeout):
            self.poweroff()

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def refs(self) -> list[ProcRef]:
        """The host's live nspawn and init (keep them before `destroy` to verify it after)."""
        return [r for r in (self.init(), self.nspawn()) if r]
