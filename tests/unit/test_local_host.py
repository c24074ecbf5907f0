"""Local host: idempotent files, and where the database's files go."""

import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from haflow.components.base import DesiredState, Directory, File
from haflow.hosts import local
from haflow.hosts.local import LocalHost, is_root, reachable_by


@pytest.fixture
def host(tmp_path):
    """A local host on a temporary state dir; its runtime dir (under /run) is removed after."""
    h = LocalHost(tmp_path / "state", "t")
    yield h
    shutil.rmtree(h.run_base, ignore_errors=True)


def test_apply_reports_changes_once(tmp_path, host):
    f = File(tmp_path / "state/nodes/n1/x.conf", "a = 1\n", 0o640)
    desired = DesiredState(dirs=[Directory(tmp_path / "state/nodes/n1/d", 0o700)], files=[f])
    first = host.apply("n1", desired)
    assert f.path in first and f.path.read_text() == "a = 1\n"
    assert stat.S_IMODE(f.path.stat().st_mode) == 0o640
    assert host.apply("n1", desired) == []
    f.path.chmod(0o644)  # drift in mode is repaired and reported
    assert host.apply("n1", desired) == [f.path]


def test_plan_tells_what_apply_would_change_and_changes_nothing(tmp_path, host):
    f = File(tmp_path / "state/nodes/n1/x.conf", "a = 1\n", 0o640)
    d = Directory(tmp_path / "state/nodes/n1/d", 0o700)
    desired = DesiredState(dirs=[d], files=[f])
    planned = {(c.path, c.what) for c in host.plan("n1", desired)}
    assert (f.path, "create") in planned and (d.path, "create") in planned
    assert not f.path.exists() and not d.path.exists()  # a dry run
    host.apply("n1", desired)
    assert host.plan("n1", desired) == []
    f.path.write_text("a = 2\n")
    f.path.chmod(0o640)
    assert [(c.path, c.what) for c in host.plan("n1", desired)] == [(f.path, "update")]
    f.path.write_text("a = 1\n")
    f.path.chmod(0o600)
    assert [(c.path, c.what) for c in host.plan("n1", desired)] == [(f.path, "mode")]


def test_local_host_implements_the_host_contract(host):
    from haflow.hosts.base import Host, Machine
    assert isinstance(host, Host)
    assert host.machines() == [Machine("local", ())]


def test_supervisor_config_escapes_percent_signs(tmp_path, host):
    from haflow.components.base import Service
    desired = DesiredState(services=[Service("svc", ("/bin/echo", "100%"), env={"A": "5%"})])
    host.apply("n1", desired)
    conf = (tmp_path / "state/nodes/n1/supervisord.conf").read_text()
    assert "100%%" in conf and 'A="5%%"' in conf


@pytest.mark.skipif(not is_root(), reason="relocation applies when root runs PostgreSQL as postgres")
def test_database_files_move_out_of_a_directory_postgres_cannot_reach(tmp_path):
    hidden = tmp_path / "private"
    hidden.mkdir(mode=0o700)
    os.chmod(hidden, 0o700)
    host = LocalHost(hidden / "state", "t")
    assert not reachable_by(hidden / "state", "postgres")
    layout = host.layout("node1")
    assert layout.db_root.is_relative_to(local.DB_RELOCATION_BASE) and layout.db_root.name == "node1"
    host.apply("node1", DesiredState(dirs=[Directory(layout.db_root, 0o700, "postgres")]))
    link = hidden / "state/nodes/node1/pg"
    assert link.is_symlink() and link.resolve() == layout.db_root
    host.purge()
    assert not layout.db_root.exists()


@pytest.mark.skipif(not is_root(), reason="only root runs PostgreSQL as another user")
def test_a_new_clusters_database_goes_outside_even_under_an_open_parent():
    """The state directory of a new cluster becomes 0700 when `up` claims it. Asked before that
    (benchmarks build the venvs first), the answer must already be "outside": it once said
    "inside", and Patroni could not start (SPAWN_ERROR)."""
    open_dir = Path(tempfile.mkdtemp(dir="/var/tmp"))
    try:
        open_dir.chmod(0o755)
        host = LocalHost(open_dir / "state", "t")
        assert host.layout("node1").db_root.is_relative_to(local.DB_RELOCATION_BASE)
    finally:
        shutil.rmtree(open_dir)


def test_an_older_clusters_database_stays_where_it_is():
    open_dir = Path(tempfile.mkdtemp(dir="/var/tmp"))
    try:
        open_dir.chmod(0o755)
        (open_dir / "state/nodes/node1/pg").mkdir(parents=True)
        host = LocalHost(open_dir / "state", "t")
        assert host.layout("node1").db_root == open_dir / "state/nodes/node1/pg"
    finally:
        shutil.rmtree(open_dir)


def test_preflight_names_a_taken_port_and_its_field(tmp_path):
    import socket
    host = LocalHost(tmp_path / "state", "t")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.97", 2379))
        s.listen()
        problems = host.preflight("node1", {("127.0.0.97", 2379): "ports.etcd_client",
                                             ("127.0.0.97", 5432): "ports.postgres"})
    assert len(problems) == 1
    assert problems[0].startswith("node1: 127.0.0.97:2379 (ports.etcd_client) is already in use")
    assert "choose another ports.etcd_client" in problems[0]


def test_preflight_refuses_an_address_this_machine_lacks(tmp_path):
    host = LocalHost(tmp_path / "state", "t")
    (problem,) = host.preflight("node1", {("192.0.2.10", 2379): "ports.etcd_client"})
    assert "192.0.2.10 is not on this machine" in problem


def test_a_killed_service_not_yet_reaped_is_not_its_running_instance(tmp_path, host, monkeypatch):
    """A SIGKILLed process stays a zombie until its parent (supervisord) reaps it: its PID and
    start time still match, but it is no running instance (the drills' fault check relied on it)."""
    import signal
    import subprocess
    import time

    child = subprocess.Popen(["sleep", "60"])
    try:
        info = {"pid": child.pid, "start": time.time(), "statename": "RUNNING"}
        monkeypatch.setattr(host, "service_info", lambda node, service: info)
        assert host.instance("n1", "svc") is not None
        child.send_signal(signal.SIGKILL)
        time.sleep(0.3)  # dead, and not reaped: we are its parent and have not waited
        assert host.instance("n1", "svc") is None
    finally:
        child.kill()
        child.wait()
