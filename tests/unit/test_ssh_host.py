"""The SSH host's pieces that need no server: units, env files, tmpfiles, the helper it sends,
wheel selection, the releases table. (tests/lab/test_deploy.py runs it against real hosts.)"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import yaml

from haflow import distros
from haflow.components.base import Directory, Service
from haflow.hosts import wheelhouse
from haflow.hosts.ssh import SshHost, _unit_quote, env_file_text, tmpfiles_text
from haflow.spec import Spec, default_spec_text, load_spec

AGENT = resources.files("haflow").joinpath("data", "host_agent.py").read_text()


def ssh_spec(tmp_path: Path) -> Spec:
    data = yaml.safe_load(default_spec_text())
    for i, n in enumerate(data["nodes"]):
        n["address"] = f"10.9.0.{11 + i}"
        n["ssh"] = {"user": "admin", "key": "id_ed25519", "known_hosts": "known"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_spec(path)


def agent(request: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", AGENT], input=json.dumps(request), capture_output=True, text=True)
    return json.loads(r.stdout)


def test_env_file_values_are_literal_for_systemd():
    text = env_file_text({"B": 'a "q" \\ $HOME `x`', "A": '{"k": [1]}'})
    assert text.splitlines() == ['A="{\\"k\\": [1]}"', 'B="a \\"q\\" \\\\ \\$HOME \\`x\\`"']


def test_exec_arguments_are_quoted_for_systemd():
    assert _unit_quote('/a b/%i "$X"') == '"/a b/%%i \\"$$X\\""'


def test_a_unit_restarts_on_failure_in_order_and_belongs_to_the_target(tmp_path):
    host = SshHost(ssh_spec(tmp_path), tmp_path / "state", tmp_path)
    try:
        text = host.unit_text("node1", Service("patroni", ("/opt/p/bin/patroni", "/x.yml"), user="postgres",
                                                reload_signal="HUP", after=("etcd",)))
    finally:
        host.close()
    lines = text.splitlines()
    assert "Restart=on-failure" in lines and "User=postgres" in lines
    assert "After=network-online.target haflow-haflow-etcd.service" in lines
    assert "WantedBy=haflow-haflow.target" in lines and "PartOf=haflow-haflow.target" in lines
    assert "ExecReload=/bin/kill -s HUP $MAINPID" in lines
    assert "EnvironmentFile=/etc/haflow/haflow/env/patroni.env" in lines


def test_ssh_paths_are_relative_to_the_spec(tmp_path):
    host = SshHost(ssh_spec(tmp_path), tmp_path / "state", tmp_path)
    host.close()
    t = host.targets[0]
    assert (t.user, t.host, t.key, t.known_hosts) == ("admin", "10.9.0.11", str(tmp_path / "id_ed25519"), str(tmp_path / "known"))


def test_runtime_folders_come_back_at_boot_parents_first():
    text = tmpfiles_text([Directory(Path("/run/haflow/c/pg"), 0o700, "postgres"), Directory(Path("/run/haflow/c"), 0o755)])
    assert text.splitlines()[1:] == ["d /run/haflow/c 0755 root - -", "d /run/haflow/c/pg 0700 postgres - -"]


def test_the_helper_applies_files_once_and_a_dry_run_changes_nothing(tmp_path):
    me = __import__("pwd").getpwuid(os.getuid()).pw_name
    f = {"path": str(tmp_path / "d/conf"), "mode": 0o600, "owner": me, "content": base64.b64encode(b"a=1\n").decode()}
    d = {"path": str(tmp_path / "d"), "mode": 0o750, "owner": me}
    dry = agent({"verb": "apply", "dry_run": True, "diff": True, "dirs": [d], "files": [f]})
    assert [c["what"] for c in dry["changes"]] == ["create", "create"] and not (tmp_path / "d").exists()
    assert "not shown" in dry["changes"][1]["diff"]  # a 0600 file holds secrets: no diff
    done = agent({"verb": "apply", "dirs": [d], "files": [f]})
    assert len(done["changes"]) == 2 and (tmp_path / "d/conf").read_text() == "a=1\n"
    assert (tmp_path / "d/conf").stat().st_mode & 0o777 == 0o600
    assert agent({"verb": "apply", "dirs": [d], "files": [f]})["changes"] == []
    public = {**f, "mode": 0o644, "content": base64.b64encode(b"a=2\n").decode()}
    diff = agent({"verb": "apply", "dry_run": True, "diff": True, "files": [public]})["changes"][0]["diff"]
    assert "-a=1" in diff and "+a=2" in diff


def test_the_helper_checksums_a_tree_as_haflow_does(tmp_path):
    from haflow.fsutil import tree_checksum
    (tmp_path / "t/sub").mkdir(parents=True)
    (tmp_path / "t/a.py").write_text("x")
    (tmp_path / "t/sub/b.py").write_text("y")
    (tmp_path / "t/a-b.py").write_text("z")
    assert agent({"verb": "tree_checksum", "path": str(tmp_path / "t")})["checksum"] == tree_checksum(tmp_path / "t")


def test_the_helper_reports_an_error_in_one_line():
    assert "KeyError" in agent({"verb": "apply", "files": [{"path": "/x"}]})["error"]


def test_only_wheels_for_the_servers_python_are_kept():
    assert wheelhouse._fits("ydiff-1.4.2-py3-none-any.whl", "3.13")
    assert wheelhouse._fits("psutil-7.2.2-cp36-abi3-manylinux2014_x86_64.whl", "3.13")
    assert wheelhouse._fits("pyyaml-6.0.4-cp313-cp313-manylinux2014_x86_64.whl", "3.13")
    assert not wheelhouse._fits("pyyaml-6.0.4-cp311-cp311-manylinux2014_x86_64.whl", "3.13")


def test_the_wheelhouse_key_follows_the_constraints_content(tmp_path):
    c = tmp_path / "c.txt"
    c.write_text("a==1\n")
    k1 = wheelhouse.key(["x", "--constraint", str(c)], "3.13", "x86_64")
    c.write_text("a==2\n")
    assert wheelhouse.key(["x", "--constraint", str(c)], "3.13", "x86_64") != k1
    assert wheelhouse.key(["x", "--constraint", str(c)], "3.11", "x86_64").startswith("py311-x86_64-")


def test_postgres_is_the_releases_own_unless_the_spec_names_one():
    assert distros.postgres_version(None, "debian", "13") == 17
    assert distros.postgres_version(None, "debian", "12") == 15
    assert distros.postgres_version(16, "debian", "13") == 16
    assert distros.find("debian", "11") is None


@pytest.mark.parametrize("field", ["key", "known_hosts"])
def test_an_empty_ssh_path_is_a_spec_error(tmp_path, field):
    data = yaml.safe_load(default_spec_text())
    for n in data["nodes"]:
        n["ssh"] = {field: " "}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    r = subprocess.run([sys.executable, "-m", "haflow.cli", "validate", "-f", str(path)], capture_output=True, text=True)
    assert r.returncode == 2 and f"nodes[0].ssh.{field}" in r.stderr, r.stderr


def test_clock_skew_is_measured_when_the_server_answered_not_when_it_is_read(tmp_path, monkeypatch):
    """facts are cached: compared with time.time() at preflight, an answer read 25 s later made
    an in-sync server look 25 s off (seen on the lab); a slow answer is no skew either."""
    import time as time_mod

    host = SshHost(ssh_spec(tmp_path), tmp_path / "state", tmp_path)
    offsets = {"node1": 0.0, "node2": 10.0}

    def slow_agent(node, verb, **request):
        time_mod.sleep(1.0)  # the server answers after 1 s; its clock read in the middle
        return {"time": time_mod.time() - 0.5 + offsets.get(node, 0.0)}

    monkeypatch.setattr(host, "agent", slow_agent)
    try:
        assert host.facts("node1")["skew_s"] < 0.3
        assert 9.0 < host.facts("node2")["skew_s"] <= 10.0  # at least this far off, whatever the round trip
        real_time = time_mod.time
        monkeypatch.setattr(time_mod, "time", lambda: real_time() + 25)  # read much later: same answer
        assert host.facts("node1")["skew_s"] < 0.3
    finally:
        host.close()


def test_a_stop_waits_past_systemds_own_stop_timeout(tmp_path, monkeypatch):
    """A worker's warm shutdown may take its whole TimeoutStopSec (600 s): the command must
    outwait it (systemd SIGKILLs then), not give up at the same moment (seen in a CI run)."""
    from haflow.hosts import ssh as ssh_mod

    host = SshHost(ssh_spec(tmp_path), tmp_path / "state", tmp_path)
    seen = {}

    def sh(node, command, stdin=None, timeout=600):
        seen[command] = timeout
        return ssh_mod.Result(0, "", "")

    monkeypatch.setattr(host, "sh", sh)
    try:
        host.stop("node1", "airflow-worker")
        assert seen["systemctl stop haflow-haflow-airflow-worker.service"] > 600
    finally:
        host.close()
