"""Provisioning a real server (the SSH host's `provision`): what components declare they need.

- Distro packages with the server's own apt, under a policy-rc.d that keeps their default
  services from starting; the units of every package this run installed are then disabled, as
  the tutorial disables `postgresql`. Packages that were already there are never touched.
- System users, created as on the local host.
- Runtime venvs from a wheelhouse built once on this machine for the servers' Python and
  architecture (hosts/wheelhouse.py): every server gets identical versions and needs no access
  to PyPI. A marker written last makes an interrupted build be redone rather than trusted.
"""

from __future__ import annotations

import shlex
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from haflow.components.base import Needs, Venv
from haflow.hosts import wheelhouse
from haflow.hosts.base import Say
from haflow.hosts.local_provision import COMPLETE_MARKER, useradd_argv, users_in_creation_order, venv_marker

if TYPE_CHECKING:
    from haflow.hosts.ssh import SshHost

BASE_PACKAGES = ("python3-venv",)  # venvs need ensurepip
REMOTE_WHEELS = PurePosixPath("/var/cache/haflow/wheels")
POLICY_RC = "/usr/sbin/policy-rc.d"
POLICY_MARKER = "# haflow: packages being installed must not start their services (removed afterwards)"


def _packages(needs: Needs) -> list[str]:
    return [*BASE_PACKAGES, *(p.apt for p in needs.packages)]


def missing(host: "SshHost", node: str, needs: Needs) -> list[str]:
    installed = set(host.agent(node, "packages")["installed"])
    out = [f"package {p} (apt)" for p in _packages(needs) if p not in installed]
    accounts = host.agent(node, "accounts", users=list(needs.users))["users"]
    out += [f"system user {u}" for u, ok in accounts.items() if not ok]
    markers = host.agent(node, "listdir", path="/", markers=[str(v.path / COMPLETE_MARKER) for v in needs.venvs])["markers"]
    out += [f"runtime venv {v.path}" for v in needs.venvs if markers[str(v.path / COMPLETE_MARKER)] != venv_marker(v.requirements)]
    return out


def provision(host: "SshHost", node: str, needs: Needs, say: Say) -> list[str]:
    done = _install_packages(host, node, _packages(needs), say)
    done += _ensure_users(host, node, list(needs.users), say)
    for venv in needs.venvs:
        done += _ensure_venv(host, node, venv, say)
    return done


def _install_packages(host: "SshHost", node: str, packages: list[str], say: Say) -> list[str]:
    before = set(host.agent(node, "packages")["installed"])
    absent = [p for p in packages if p not in before]
    if not absent:
        return []
    say(f"{node}: installing {' '.join(absent)} (apt)")
    # Our own policy-rc.d only if the server has none (or has the one an interrupted run of ours
    # left, recognised by its marker line): the packages' services must not start (their default
    # etcd, PostgreSQL, RabbitMQ would hold the cluster's ports). Removed on exit or hang-up.
    script = (
        "set -e; export DEBIAN_FRONTEND=noninteractive; ours=0; "
        f"if [ ! -e {POLICY_RC} ] || grep -qx '{POLICY_MARKER}' {POLICY_RC}; then "
        f"printf '#!/bin/sh\n{POLICY_MARKER}\nexit 101\n' > {POLICY_RC}; chmod 755 {POLICY_RC}; ours=1; fi; "
        f"cleanup() {{ if [ $ours = 1 ]; then rm -f {POLICY_RC}; fi; }}; "
        "trap cleanup EXIT; trap 'cleanup; exit 1' HUP INT TERM; "
        "apt-get -o DPkg::Lock::Timeout=120 -q update >/dev/null; "
        "apt-get -o DPkg::Lock::Timeout=120 -q install -y --no-install-recommends "
        + " ".join(shlex.quote(p) for p in absent)
    )
    r = host.sh(node, script, timeout=1800)
    if not r.ok:
        tail = " | ".join((r.stderr or r.stdout).strip().splitlines()[-3:])
        raise wheelhouse.ProvisionError(f"{node}: apt could not install {' '.join(absent)}: {tail}; fix the server's "
                                        "apt sources (or install them by hand) and re-run")
    after = host.agent(node, "packages", units_of=sorted(set(host.agent(node, "packages")["installed"]) - before))
    new_units = sorted({u for units in after["units"].values() for u in units})
    if new_units:
        # only what this run installed: a service the server had before is not ours to stop
        host.sh(node, "systemctl disable --now " + " ".join(shlex.quote(u) for u in new_units) + " 2>/dev/null; true")
    done = [f"{node}: installed {' '.join(absent)}"]
    if new_units:
        done.append(f"{node}: disabled the packages' own services ({', '.join(new_units)})")
    return done


def _ensure_users(host: "SshHost", node: str, users: list[str], say: Say) -> list[str]:
    exists = host.agent(node, "accounts", users=users)["users"]
    created = []
    for user in users_in_creation_order(users):
        if exists[user]:
            continue
        say(f"{node}: creating system user {user}")
        r = host.sh(node, shlex.join(useradd_argv(user)))
        if not r.ok:
            raise wheelhouse.ProvisionError(f"{node}: could not create system user {user}: {r.stderr.strip()[-200:]}")
        created.append(f"{node}: created system user {user}")
    return created


def _ensure_venv(host: "SshHost", node: str, venv: Venv, say: Say) -> list[str]:
    marker = venv.path / COMPLETE_MARKER
    wanted = venv_marker(venv.requirements)
    if host.agent(node, "listdir", path="/", markers=[str(marker)])["markers"][str(marker)] == wanted:
        return []
    facts = host.facts(node)
    local = wheelhouse.build(list(venv.requirements), facts["python"], facts["arch"], say)
    remote = REMOTE_WHEELS / local.name
    _upload(host, node, local, remote, say)
    say(f"{node}: building runtime venv {venv.path.name} from the wheelhouse")
    args = [f"--constraint {shlex.quote(str(remote / Path(a).name))}" if Path(a).is_file() else shlex.quote(a)
            for a in venv.requirements if a != "--constraint"]
    v = shlex.quote(str(venv.path))
    script = (f"set -e; rm -rf {v}; mkdir -p $(dirname {v}); python3 -m venv {v}; "
              f"{v}/bin/pip install -q --disable-pip-version-check --no-index --find-links {remote} {' '.join(args)}; "
              f"chmod -R a+rX {v}; printf '%s' {shlex.quote(wanted)} > {v}/{COMPLETE_MARKER}")
    r = host.sh(node, script, timeout=1800)
    if not r.ok:
        tail = " | ".join((r.stderr or r.stdout).strip().splitlines()[-3:])
        raise wheelhouse.ProvisionError(f"{node}: could not build {venv.path}: {tail}; re-run `haflow deploy`")
    return [f"{node}: built runtime venv {venv.path}"]


def _upload(host: "SshHost", node: str, local: Path, remote: PurePosixPath, say: Say) -> None:
    """Copy the wheelhouse files the server lacks (the constraints file too)."""
    have = set(host.agent(node, "listdir", path=str(remote))["files"] or [])
    need = sorted(p for p in local.iterdir() if p.is_file() and not p.name.startswith(".") and p.name not in have)
    if not need:
        return
    say(f"{node}: copying {len(need)} wheels ({sum(p.stat().st_size for p in need) / 2**20:.0f} MiB)")
    host.upload(node, need, remote)
