"""Wheelhouses: every Python package a runtime venv needs, as wheels for the servers' Python and
architecture, built once on this machine and copied to every server.

The servers' Python may differ from this machine's (Debian 13 has 3.13, Debian 12 3.11): pip
downloads binary wheels for the target (`--python-version`, `--platform`, `--only-binary`).
A dependency published only as a source archive (Patroni's ydiff) is first built into a wheel
here; a pure-Python one then fits any target. The result is cached by what it was built from
(requirements, constraints content, Python, architecture) and kept complete-or-absent.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from haflow.errors import HaflowError
from haflow.hosts.base import Say

MANYLINUX_MINORS = range(17, 42)  # glibc 2.17 .. 2.41 (Debian 13)
COMPLETE = ".complete"


class ProvisionError(HaflowError):
    """Installing on a server failed: names the server and what to do."""


def cache_root() -> Path:
    if env := os.environ.get("HAFLOW_WHEELHOUSE"):
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/haflow/wheelhouse")
    return Path.home() / ".cache/haflow/wheelhouse"


def key(requirements: list[str], python: str, arch: str) -> str:
    h = hashlib.sha256(f"{python} {arch}\n".encode())
    for a in requirements:
        h.update(Path(a).read_bytes() if Path(a).is_file() else a.encode())
        h.update(b"\0")
    return f"py{python.replace('.', '')}-{arch}-{h.hexdigest()[:12]}"


def target_options(python: str, arch: str) -> list[str]:
    tag = python.replace(".", "")
    platforms = [f"manylinux_2_{m}_{arch}" for m in MANYLINUX_MINORS] + [f"manylinux2014_{arch}", f"linux_{arch}"]
    return ["--only-binary=:all:", "--python-version", python, "--implementation", "cp",
            "--abi", f"cp{tag}", "--abi", "abi3", "--abi", "none", *(x for p in platforms for x in ("--platform", p))]


_LOCK = threading.Lock()  # servers provision in parallel: one build per wheelhouse


def build(requirements: list[str], python: str, arch: str, say: Say) -> Path:
    """The folder of wheels (plus any constraints file) for these requirements on that target."""
    with _LOCK:
        return _build(requirements, python, arch, say)


def _build(requirements: list[str], python: str, arch: str, say: Say) -> Path:
    root = cache_root()
    dest = root / key(requirements, python, arch)
    if (dest / COMPLETE).exists():
        return dest
    say(f"building a wheelhouse for Python {python} on {arch} ({requirements[0]})")
    tmp = root / f".{dest.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for a in requirements:
            if Path(a).is_file():
                shutil.copy2(a, tmp / Path(a).name)
        pins = _resolve(requirements, python, arch, tmp)
        _fetch(pins, python, arch, tmp)
    except ProvisionError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / COMPLETE).write_text("")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def _resolve(requirements: list[str], python: str, arch: str, folder: Path) -> list[str]:
    """Every package and version the target needs, markers evaluated for the target's Python
    (pip evaluates them for its own: Python 3.13-only dependencies would be missed)."""
    from uv import find_uv_bin

    wanted = folder / "requirements.in"
    wanted.write_text("\n".join(a for a in requirements if a != "--constraint" and not Path(a).is_file()) + "\n")
    constraints = [x for a in requirements if Path(a).is_file() for x in ("--constraint", a)]
    r = subprocess.run([find_uv_bin(), "pip", "compile", str(wanted), *constraints, "--python-version", python,
                        "--python-platform", f"{arch}-manylinux_2_28", "--no-header", "--no-annotate", "--quiet"],
                       capture_output=True, text=True)
    wanted.unlink()
    if r.returncode != 0:
        raise ProvisionError(f"could not resolve {requirements[0]} for Python {python} on {arch}: "
                             f"{_tail(r.stderr)}; check this machine reaches the package index, then re-run")
    return [line.strip() for line in r.stdout.splitlines() if line.strip() and not line.startswith("#")]


def _fetch(pins: list[str], python: str, arch: str, folder: Path) -> None:
    """The wheel of every pin for the target; a pin published only as a source archive is
    built into a wheel here, and must then be pure Python to fit the target."""
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    pinned = folder / "requirements.txt"
    pinned.write_text("\n".join(pins) + "\n")
    r = subprocess.run([*pip, "download", "--no-deps", *target_options(python, arch), "-d", str(folder), "-r", str(pinned)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        for pin in pins:
            if subprocess.run([*pip, "download", "--no-deps", *target_options(python, arch), "-d", str(folder), pin],
                              capture_output=True, text=True).returncode == 0:
                continue
            built = subprocess.run([*pip, "wheel", "--no-deps", "-w", str(folder), pin], capture_output=True, text=True)
            if built.returncode != 0:
                raise ProvisionError(f"no wheel of {pin} for Python {python} on {arch}, and it does not build here: "
                                     f"{_tail(built.stderr)}")
    for wheel in folder.glob("*.whl"):  # what this machine built for its own Python is no use there
        if not _fits(wheel.name, python):
            raise ProvisionError(f"{wheel.name} was built for this machine's Python, not the servers' {python}; "
                                 "install that package's build tools or provide its wheel")


def _tail(text: str) -> str:
    return " | ".join(line for line in text.strip().splitlines() if not line.startswith("WARNING"))[-400:]


def _fits(name: str, python: str) -> bool:
    tags = name[:-4].split("-")
    py, abi = tags[-3], tags[-2]
    tag = "cp" + python.replace(".", "")
    return abi in ("none", "abi3") or tag in py.split(".") or tag in abi
