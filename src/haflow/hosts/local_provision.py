"""Provisioning this machine (the local host's `provision`): what components declare they need.

Binaries come from the distro (apt, installed when haflow runs as root on Debian/Ubuntu;
otherwise the exact command to run is the error). Python services (Patroni, Airflow) live in
their own venvs built from the distro's Python, so the service users can execute them.
"""

from __future__ import annotations

import contextlib
import getpass
import grp
import hashlib
import os
import pwd
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Callable

from haflow.components.base import Needs, Package
from haflow.errors import HaflowError, UserError

SYSTEM_PYTHON = Path("/usr/bin/python3")
COMPLETE_MARKER = ".haflow-complete"

Progress = Callable[[str], None]


def is_root() -> bool:
    return os.geteuid() == 0


def default_db_user() -> str:
    return "postgres" if is_root() else getpass.getuser()


# Building venvs needs the system Python's venv module: a need of this host, not of a component.
VENV_SUPPORT = Package("python3-venv", "python3-venv")


def present(package: Package) -> bool:
    if package is VENV_SUPPORT:
        return _system_venv_available()
    return all(shutil.which(c) for c in package.commands) and all(p.exists() for p in package.paths)


def _system_venv_available() -> bool:
    if not SYSTEM_PYTHON.exists():
        return False
    r = subprocess.run([str(SYSTEM_PYTHON), "-c", "import venv, ensurepip"], capture_output=True)
    return r.returncode == 0


def missing(needs: Needs) -> list[Package]:
    wanted = [*needs.packages, *([VENV_SUPPORT] if needs.venvs else [])]
    return [p for p in wanted if not present(p)]


def ensure_packages(needs: Needs, progress: Progress) -> list[str]:
    """Install missing distro packages (as root with apt) or explain how; returns what was installed."""
    need = missing(needs)
    if not need:
        return []
    packages = sorted({r.apt for r in need})
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    if not is_root() or shutil.which("apt-get") is None:
        what = ", ".join(r.what for r in need)
        raise UserError(f"missing {what}; install with: sudo apt-get update && sudo {' '.join(cmd)}")
    progress(f"installing {' '.join(packages)} with apt")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with _services_not_started():
        for argv in (["apt-get", "update", "-qq"], cmd):
            r = subprocess.run(argv, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
                raise UserError(f"`{' '.join(argv)}` failed ({tail[0]}); fix apt and re-run `haflow up`")
    _disable_distro_services(packages)
    still = missing(needs)
    if still:
        raise UserError(f"still missing after apt: {', '.join(r.what for r in still)}")
    return packages


def provision(needs: Needs, progress: Progress) -> list[str]:
    """Packages, then the system users the services run as, then the runtime venvs; returns
    what was done (nothing on a re-run)."""
    done = [f"installed {p}" for p in ensure_packages(needs, progress)]
    done += [f"created system user {u}" for u in ensure_service_users(list(needs.users), progress)]
    for venv in needs.venvs:
        if ensure_venv(venv.path, list(venv.requirements), progress):
            done.append(f"built {venv.path}")
        check_traversable(venv.path, venv.user or "root")
    return done


POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
# Services the distro packages enable that would take the ports haflow's own processes bind
# (rabbitmq-server and epmd listen on 0.0.0.0); etcd, PostgreSQL and HAProxy's defaults do not clash.
DISTRO_SERVICES = {"rabbitmq-server": ["rabbitmq-server.service", "epmd.socket", "epmd.service"]}


@contextlib.contextmanager
def _services_not_started():
    """Debian's policy-rc.d convention: exit 101 keeps maintainer scripts from starting services."""
    if POLICY_RC_D.exists():
        yield
        return
    POLICY_RC_D.write_text("#!/bin/sh\n# written by haflow during apt-get install; removed right after\nexit 101\n")
    POLICY_RC_D.chmod(0o755)
    try:
        yield
    finally:
        POLICY_RC_D.unlink(missing_ok=True)


def _disable_distro_services(packages: list[str]) -> None:
    """haflow runs these itself: keep the distro's copies from starting at the next boot."""
    units = [u for p in packages for u in DISTRO_SERVICES.get(p, [])]
    if units and shutil.which("systemctl") and Path("/run/systemd/system").is_dir():
        subprocess.run(["systemctl", "disable", "--now", *units], capture_output=True)


# Users haflow creates whose primary group is another's: the workers share Airflow's group (DAG
# copies and task logs) but not its files.
PRIMARY_GROUP = {"airflow-worker": "airflow"}


def useradd_argv(user: str) -> list[str]:
    """How haflow creates a service user, on this machine and on a server alike."""
    group = ["--gid", PRIMARY_GROUP[user]] if user in PRIMARY_GROUP else ["--user-group"]
    return ["useradd", "--system", *group, "--no-create-home", "--home-dir", "/nonexistent",
            "--shell", "/usr/sbin/nologin", "--comment", "haflow service user", user]


def users_in_creation_order(users: list[str]) -> list[str]:
    return sorted(users, key=lambda u: u in PRIMARY_GROUP)  # a group's owner first


def venv_marker(requirements: list[str] | tuple[str, ...]) -> str:
    """What a venv was built from, as its completion marker holds it: the requirements, a file
    argument (the constraints) by its content, so a new clone of haflow shipping the same file
    elsewhere does not rebuild the venv."""
    return "\n".join(_digest(a) if Path(a).is_file() else a for a in requirements)


def ensure_service_users(users: list[str], progress: Progress) -> list[str]:
    """System users the services run as: the distro packages create theirs; haflow creates the
    rest (`airflow`, `airflow-worker`), locked, without a login shell or home. Returns the users
    created."""
    created = []
    for user in users_in_creation_order(users):
        try:
            pwd.getpwnam(user)
            continue
        except KeyError:
            pass
        if not is_root():
            raise UserError(f"system user {user!r} is missing; create it with: "
                            f"sudo useradd --system --user-group --no-create-home --shell /usr/sbin/nologin {user}")
        progress(f"creating system user {user}")
        _run(useradd_argv(user), f"create system user {user}")
        created.append(user)
    return created


def ensure_venv(venv: Path, requirements: list[str], progress: Progress) -> bool:
    """Create (or repair) a runtime venv with exactly these requirements; True if built.
    A marker written last makes an interrupted build be redone rather than trusted."""
    marker = venv / COMPLETE_MARKER
    wanted = venv_marker(requirements)
    if marker.exists() and marker.read_text() == wanted:
        return False
    if venv.exists():
        shutil.rmtree(venv)
    progress(f"building runtime venv {venv.name} ({requirements[0]}; takes a minute or two the first time)")
    venv.parent.mkdir(parents=True, exist_ok=True)
    _run([str(SYSTEM_PYTHON), "-m", "venv", str(venv)], "create the venv")
    _run([str(venv / "bin/pip"), "install", "-q", "--disable-pip-version-check", *requirements], f"pip install {' '.join(requirements)}")
    _make_world_readable(venv)
    marker.write_text(wanted)
    return True


def _digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _run(argv: list[str], what: str) -> None:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise HaflowError(f"could not {what}: {' | '.join(tail)}")


def _make_world_readable(root: Path) -> None:
    """Service users (postgres) must read and execute the venv that root built."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            if p.is_symlink():
                continue
            mode = p.stat().st_mode
            extra = stat.S_IRGRP | stat.S_IROTH
            if p.is_dir() or mode & stat.S_IXUSR:
                extra |= stat.S_IXGRP | stat.S_IXOTH
            os.chmod(p, stat.S_IMODE(mode) | extra)


def check_traversable(path: Path, user: str) -> None:
    """The service user must be able to reach its files: every ancestor needs execute for it."""
    if not is_root() or user == "root":
        return
    blocked = unreachable_ancestor(path, user)
    if blocked is not None:
        raise UserError(
            f"{path} is not reachable by user {user!r} ({blocked} is mode {stat.S_IMODE(blocked.stat().st_mode):o}); "
            f"set HAFLOW_VENVS to a directory it can reach, e.g. /var/lib/haflow/venvs"
        )


def group_ids(user: str) -> set[int]:
    pw = pwd.getpwnam(user)
    return {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}


def unreachable_ancestor(path: Path, user: str) -> Path | None:
    """The first existing directory on the way to `path` that `user` may not traverse."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return None
    groups = group_ids(user)
    for d in reversed([path, *path.parents]):
        if not d.exists():
            break
        st = d.stat()
        if st.st_uid == pw.pw_uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid in groups:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            return d
    return None


def reachable_by(path: Path, user: str) -> bool:
    return unreachable_ancestor(path, user) is None
