"""The lab's base image: a minimal Debian with systemd and sshd, built once per release with
debootstrap and cached; every lab host boots it read-only under its own overlay layer.

The base carries no identity (no machine-id, no SSH host keys): each host's layer gets its own.
It must not change while hosts run (it is their overlay's lower layer), so it is only built or
prepared when no host is up.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable

from haflow.errors import HaflowError, UserError

RELEASES = {"trixie": "13", "bookworm": "12"}
DEFAULT_RELEASE = "trixie"
INCLUDE = "systemd,systemd-sysv,dbus,iproute2,openssh-server,python3,python3-venv,sudo,ca-certificates"
COMPLETE = ".haflow-base-complete"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
APT_SOURCES = (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list"))
MASKED = ("apt-daily.timer", "apt-daily-upgrade.timer")  # no background apt holding the dpkg lock

Say = Callable[[str], None]


def mirror() -> str:
    """The Debian mirror this machine's apt uses (the lab's hosts use the same, through NAT)."""
    for path in APT_SOURCES:
        try:
            text = path.read_text()
        except OSError:
            continue
        for word in text.split():
            if word.startswith(("http://", "https://")) and word.rstrip("/").endswith("/debian"):
                return word.rstrip("/")
    return DEFAULT_MIRROR


def sources(release: str, base_url: str) -> str:
    security = base_url.rsplit("/", 1)[0] + "/debian-security"
    return (f"Types: deb\nURIs: {base_url}\nSuites: {release} {release}-updates\nComponents: main\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
            f"Types: deb\nURIs: {security}\nSuites: {release}-security\nComponents: main\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")


def base_dir(cache: Path, release: str) -> Path:
    return cache / f"{release}-base"


def ensure_base(cache: Path, release: str, say: Say) -> Path:
    """The prepared base for `release`, built on first use (about 47 s); a build that was
    interrupted is redone, never trusted."""
    if release not in RELEASES:
        raise UserError(f"unknown release {release!r}; choose one of: {', '.join(RELEASES)}")
    base = base_dir(cache, release)
    if (base / COMPLETE).exists():
        return base
    tmp = cache / f".{release}-base.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    os.chmod(cache, 0o700)
    url = mirror()
    say(f"building the {release} base image with debootstrap from {url} (once; about a minute)")
    r = subprocess.run(["debootstrap", "--variant=minbase", f"--include={INCLUDE}", release, str(tmp), url],
                       capture_output=True, text=True)
    if r.returncode != 0:
        tail = " | ".join((r.stderr or r.stdout).strip().splitlines()[-3:])
        shutil.rmtree(tmp, ignore_errors=True)
        raise HaflowError(f"debootstrap of {release} failed: {tail}; check that the mirror {url} is reachable and re-run")
    _prepare(tmp, release, url)
    shutil.rmtree(base, ignore_errors=True)
    tmp.rename(base)
    (base / COMPLETE).write_text(f"{release} {url}\n")
    return base


def _prepare(root: Path, release: str, url: str) -> None:
    """No identity, no background apt, networkd on, the machine's resolver, apt's own mirror."""
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    apt = root / "etc/apt"
    (apt / "sources.list").unlink(missing_ok=True)
    (apt / "sources.list.d").mkdir(parents=True, exist_ok=True)
    (apt / "sources.list.d/debian.sources").write_text(sources(release, url))
    system = root / "etc/systemd/system"
    for unit in MASKED:
        link = system / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    _enable(root, "systemd-networkd.service", "multi-user.target.wants")
    _enable(root, "systemd-networkd.socket", "sockets.target.wants")
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc/machine-id").write_text("")  # truly empty: nspawn refuses a lone newline
    dbus_id = root / "var/lib/dbus/machine-id"
    dbus_id.parent.mkdir(parents=True, exist_ok=True)
    dbus_id.unlink(missing_ok=True)
    dbus_id.symlink_to("/etc/machine-id")
    resolv = root / "etc/resolv.conf"
    resolv.unlink(missing_ok=True)
    shutil.copy2("/etc/resolv.conf", resolv)


def _enable(root: Path, unit: str, wants: str) -> None:
    for lib in ("usr/lib/systemd/system", "lib/systemd/system"):
        if (root / lib / unit).exists():
            target = root / "etc/systemd/system" / wants
            target.mkdir(parents=True, exist_ok=True)
            link = target / unit
            link.unlink(missing_ok=True)
            link.symlink_to(f"/{lib}/{unit}")
            return
