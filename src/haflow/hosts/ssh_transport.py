"""How haflow reaches real hosts: one asyncssh connection per host, all hosts in parallel.

The few primitives the SSH host builds on: run a command as root (through `sudo -n` when the
login user is not root), and put a file only when its content, mode or owner differ (checked on
the host, written to a temporary file and renamed: a reader never sees half a file). Host keys
are always checked (known_hosts); `check` runs before every connection (the lab refuses an
address its bridge does not route).

Measured on the lab (notes/field-notes-lab.md §5): a no-op round over 3 hosts takes 0.15 s this
way, against 2.8-3.2 s with pyinfra.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import shlex
from collections.abc import Callable
from dataclasses import dataclass

import asyncssh

CONNECT_TIMEOUT_S = 10
# A powered-off or cut-off server answers nothing: without keepalives a command on its open
# connection would wait for the command's own timeout. With these, a dead connection is found
# within about 6 s and the next command reconnects.
KEEPALIVE_INTERVAL_S = 2
KEEPALIVE_COUNT_MAX = 3


@dataclass(frozen=True)
class SshTarget:
    name: str  # the node
    host: str  # where to connect
    user: str = "root"
    port: int = 22
    key: str | None = None  # private key file; None: the agent and ~/.ssh
    known_hosts: str | None = None  # None: ~/.ssh/known_hosts


@dataclass(frozen=True)
class Result:
    rc: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.rc == 0


class SshPool:
    def __init__(self, targets: list[SshTarget], check: Callable[[str], None] | None = None) -> None:
        self.targets = {t.name: t for t in targets}
        self.check = check
        self._conns: dict[str, asyncssh.SSHClientConnection] = {}

    async def connect_all(self, names: list[str] | None = None) -> dict[str, str]:
        """Open every connection (or those named) at once; returns the hosts that failed with why
        (empty: all up)."""
        names = list(self.targets) if names is None else names
        results = await asyncio.gather(*(self._connect(n) for n in names), return_exceptions=True)
        return {n: f"{type(r).__name__}: {r}" for n, r in zip(names, results) if isinstance(r, BaseException)}

    async def _connect(self, name: str) -> asyncssh.SSHClientConnection:
        if name in self._conns:
            return self._conns[name]
        t = self.targets[name]
        if self.check:
            self.check(t.host)
        options = {"username": t.user, "port": t.port, "connect_timeout": CONNECT_TIMEOUT_S,
                   "keepalive_interval": KEEPALIVE_INTERVAL_S, "keepalive_count_max": KEEPALIVE_COUNT_MAX}
        if t.key:
            options["client_keys"] = [t.key]
        if t.known_hosts:
            options["known_hosts"] = t.known_hosts
        self._conns[name] = await asyncssh.connect(t.host, **options)
        return self._conns[name]

    def _as_root(self, name: str, command: str) -> str:
        return command if self.targets[name].user == "root" else f"sudo -n sh -c {shlex.quote(command)}"

    def forget(self, name: str) -> None:
        """Drop the host's connection (it died: the host was powered off or cut off); the next
        command connects again."""
        conn = self._conns.pop(name, None)
        if conn is not None:
            conn.abort()

    async def run(self, name: str, command: str, stdin: str | bytes | None = None, timeout: float = 600) -> Result:
        """A shell command on the host, as root; never raises for a non-zero exit. A connection
        found dead (the host rebooted or was cut off) is replaced once; a command that times out
        drops its connection, which may be the reason."""
        reused = name in self._conns
        try:
            return await asyncio.wait_for(self._run(name, command, stdin), timeout)
        except asyncio.TimeoutError:
            self.forget(name)
            raise
        except (asyncssh.Error, OSError):
            self.forget(name)
            if not reused:
                raise
        return await asyncio.wait_for(self._run(name, command, stdin), timeout)

    async def _run(self, name: str, command: str, stdin: str | bytes | None) -> Result:
        conn = await self._connect(name)
        r = await conn.run(self._as_root(name, command), input=stdin, check=False,
                           encoding=None if isinstance(stdin, bytes) else "utf-8")
        out, err = r.stdout or "", r.stderr or ""
        if isinstance(out, bytes):
            out, err = out.decode(errors="replace"), (err or b"").decode(errors="replace")
        return Result(r.exit_status if r.exit_status is not None else 255, out, err)

    async def put(self, name: str, path: str, content: bytes, mode: int = 0o644, owner: str = "root",
                  group: str | None = None) -> bool:
        """Make the file so; True if anything changed (content, mode or owner)."""
        group = group or owner
        want = f"{hashlib.sha256(content).hexdigest()} {mode:o} {owner} {group}"
        q = shlex.quote(path)
        have = await self.run(name, f"[ -f {q} ] && printf '%s %s\\n' \"$(sha256sum < {q} | cut -d' ' -f1)\" "
                                    f"\"$(stat -c '%a %U %G' {q})\" || true")
        if have.stdout.strip() == want:
            return False
        tmp = shlex.quote(f"{path}.haflow-tmp")
        r = await self.run(name, f"set -e; mkdir -p $(dirname {q}); umask 077; cat > {tmp}; chown {owner}:{group} {tmp}; "
                                 f"chmod {mode:o} {tmp}; mv -f {tmp} {q}", stdin=content)
        if not r.ok:
            raise OSError(f"{name}: could not write {path}: {r.stderr.strip()[-300:]}")
        return True

    async def upload(self, name: str, files: list[str], remote_dir: str) -> None:
        """Copy local files into a folder on the host (SFTP to a private temporary folder as
        the login user, then moved into place as root)."""
        conn = await self._connect(name)
        tmp = f"/tmp/.haflow-upload-{secrets.token_hex(8)}"
        async with conn.start_sftp_client() as sftp:
            await sftp.mkdir(tmp, asyncssh.SFTPAttrs(permissions=0o700))
            await sftp.put(files, tmp)
        q = shlex.quote(remote_dir)
        r = await self.run(name, f"set -e; mkdir -p {q}; chown -R root:root {tmp}; mv -f {tmp}/* {q}/; rmdir {tmp}")
        if not r.ok:
            raise OSError(f"{name}: could not move uploaded files into {remote_dir}: {r.stderr.strip()[-300:]}")

    async def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        await asyncio.gather(*(c.wait_closed() for c in self._conns.values()), return_exceptions=True)
        self._conns.clear()
