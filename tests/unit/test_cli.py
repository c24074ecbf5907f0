"""The CLI contract: exit 2 with one line per problem for bad input, never a traceback."""

import subprocess
import sys

import yaml

HAFLOW = [sys.executable, "-m", "haflow.cli"]


def run(*args, cwd=None):
    return subprocess.run([*HAFLOW, *args], capture_output=True, text=True, cwd=cwd)


def test_init_writes_the_commented_default_and_refuses_to_overwrite(tmp_path):
    target = tmp_path / "cluster.yaml"
    r = run("init", str(target))
    assert r.returncode == 0, r.stderr
    text = target.read_text()
    assert text.lstrip().startswith("#") and "127.0.0.11" in text
    assert yaml.safe_load(text)["cluster"] == "haflow"
    again = run("init", str(target))
    assert again.returncode == 2 and "already exists" in again.stderr and "--force" in again.stderr


def test_bad_spec_exits_2_with_one_line_per_problem(tmp_path):
    target = tmp_path / "bad.yaml"
    run("init", str(target))
    data = yaml.safe_load(target.read_text())
    data["nodes"][1]["adress"] = "x"
    data["nodes"][2]["name"] = "node1"
    data["ports"]["pg_primary"] = 5432
    target.write_text(yaml.safe_dump(data))
    for cmd in ("up", "status", "down"):
        r = run(cmd, "-f", str(target), "--state-dir", str(tmp_path / "state"))
        assert r.returncode == 2, (cmd, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr
        lines = r.stderr.strip().splitlines()
        assert lines[0].startswith("error:") and "problem(s)" in lines[0]
        assert any(l.strip().startswith("nodes[1].adress: unknown key") for l in lines)
        assert any(l.strip().startswith("nodes[2].name:") for l in lines)
        assert any(l.strip().startswith("ports.pg_primary:") for l in lines)
    assert not (tmp_path / "state").exists()  # bad input touches nothing


def test_missing_spec_file_exits_2(tmp_path):
    r = run("status", "-f", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "haflow init" in r.stderr and "Traceback" not in r.stderr


def test_purge_needs_confirmation(tmp_path):
    r = run("down", "--purge", "--state-dir", str(tmp_path / "state"))
    assert r.returncode == 2 and "--yes" in r.stderr


def test_unknown_node_error_is_one_line():
    from haflow.errors import UserError
    from haflow.spec import embedded_default
    try:
        embedded_default().node("node9")
    except UserError as e:
        assert "node1, node2, node3" in e.message
    else:
        raise AssertionError("expected a UserError")


def test_status_on_a_stopped_cluster_exits_1_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("HAFLOW_ADDRESSES", "127.0.0.94,127.0.0.95,127.0.0.96")  # nothing runs there
    r = run("status", "--json", "--state-dir", str(tmp_path / "state"), cwd=tmp_path)
    assert r.returncode == 1
    import json
    snap = json.loads(r.stdout)
    assert snap["healthy"] is False and set(snap["layers"]) >= {"dcs", "database", "balancer"}


def test_up_with_a_taken_port_exits_2_naming_it(tmp_path):
    import socket
    target = tmp_path / "c.yaml"
    run("init", str(target))
    data = yaml.safe_load(target.read_text())
    for node, addr in zip(data["nodes"], ["127.0.0.97", "127.0.0.98", "127.0.0.99"]):
        node["address"] = addr
    target.write_text(yaml.safe_dump(data))
    with socket.socket() as s:
        s.bind(("127.0.0.98", 8008))
        s.listen()
        r = run("up", "-f", str(target))
    assert r.returncode == 2, r.stderr
    assert "127.0.0.98:8008 (ports.patroni_api) is already in use" in r.stderr and "Traceback" not in r.stderr


def test_a_second_mutating_command_stops_at_once_naming_the_first(tmp_path):
    from haflow import lock

    state = tmp_path / "state"
    with lock.exclusive(state, "up"):
        for args in (["down"], ["switchover"], ["dags", "push"], ["drill", "switchover"]):
            r = run(*args, "--state-dir", str(state), cwd=tmp_path)
            assert r.returncode == 1, (args, r.stdout, r.stderr)
            assert r.stderr.strip().splitlines()[-1].startswith("error: another haflow command is running on this cluster")
            assert "`haflow up`" in r.stderr
    assert (state / lock.LOCK_FILE).stat().st_mode & 0o777 == 0o600
