"""A state directory knows what it holds; nothing haflow cannot prove it owns is touched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from haflow.errors import UserError
from haflow.fsutil import DiskFull, atomic_write
from haflow.spec import default_spec_text, parse_spec
from haflow.statedir import RECORD_FILE, StateDir

HAFLOW = [sys.executable, "-m", "haflow.cli"]
ADDRESSES = ["127.0.0.84", "127.0.0.85", "127.0.0.86"]  # nothing runs there


def run(*args, cwd=None):
    return subprocess.run([*HAFLOW, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def spec_data(cluster="prod"):
    data = yaml.safe_load(default_spec_text())
    data["cluster"] = cluster
    for node, addr in zip(data["nodes"], ADDRESSES):
        node["address"] = addr
    return data


def write_spec(path: Path, cluster="prod", mutate=None) -> Path:
    data = spec_data(cluster)
    if mutate:
        mutate(data)
    path.write_text(yaml.safe_dump(data))
    return path


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_purge_refuses_a_directory_that_is_not_a_state_directory(tmp_path):
    home = tmp_path / "home"
    (home / "projects").mkdir(parents=True)
    (home / "projects" / "thesis.tex").write_text("years of work")
    (home / ".bashrc").write_text("alias ll='ls -l'")
    before = tree(home)
    spec = write_spec(tmp_path / "prod.yaml")
    for how in (["--state-dir", str(home)], []):
        env_args = {"cwd": tmp_path}
        if not how:  # a stale HAFLOW_STATE_DIR
            r = subprocess.run([*HAFLOW, "down", "--purge", "--yes", "-f", str(spec)], capture_output=True, text=True,
                               env={**os.environ, "HAFLOW_STATE_DIR": str(home)}, **env_args)
        else:
            r = run("down", "--purge", "--yes", "-f", str(spec), *how, **env_args)
        assert r.returncode == 2, r.stderr
        assert "not a haflow state directory" in r.stderr and "Traceback" not in r.stderr
        assert tree(home) == before and not (home / ".lock").exists()


def test_a_second_spec_on_the_same_state_directory_is_refused_naming_both(tmp_path):
    prod = write_spec(tmp_path / "prod.yaml", "prod")
    staging = write_spec(tmp_path / "staging.yaml", "staging")
    StateDir(tmp_path / ".haflow").claim(parse_spec(spec_data("prod")), str(prod))
    before = tree(tmp_path / ".haflow")
    for cmd in (["up"], ["down"], ["down", "--purge", "--yes"], ["status"], ["switchover"], ["secrets", "show"],
                ["dags", "push"], ["drill", "switchover"], ["validate"]):
        r = run(*cmd, "-f", str(staging), cwd=tmp_path)
        assert r.returncode == 2, (cmd, r.stderr)
        assert "'prod'" in r.stderr and "'staging'" in r.stderr, r.stderr
    assert tree(tmp_path / ".haflow") == before  # the other cluster's files are untouched


def test_a_renamed_cluster_is_refused(tmp_path):
    state = StateDir(tmp_path / "state")
    state.claim(parse_spec(spec_data("prod")), "prod.yaml")
    with pytest.raises(UserError) as e:
        state.claim(parse_spec(spec_data("prod2")), "prod.yaml")
    assert "'prod'" in e.value.message and "'prod2'" in e.value.message


def test_the_record_lists_every_node_ever_in_the_cluster(tmp_path):
    state = StateDir(tmp_path / "state")
    four = spec_data()
    four["nodes"].append({"name": "node4", "address": "127.0.0.87"})
    four["etcd"]["members"] = ["node1", "node2", "node3"]
    state.claim(parse_spec(four), "s")
    three = parse_spec(spec_data())
    state.claim(three, "s")
    assert state.removed_nodes(three) == ["node4"]
    assert state.recorded_nodes(three) == ["node1", "node2", "node3", "node4"]
    rec = json.loads((tmp_path / "state" / RECORD_FILE).read_text())
    assert rec["cluster"] == "prod" and set(rec["nodes"]) == {"node1", "node2", "node3", "node4"}
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "state" / RECORD_FILE).stat().st_mode & 0o777 == 0o600


def test_status_reports_nodes_that_left_the_spec(tmp_path):
    four = spec_data()
    four["nodes"].append({"name": "node4", "address": "127.0.0.87"})
    four["etcd"]["members"] = ["node1", "node2", "node3"]
    StateDir(tmp_path / ".haflow").claim(parse_spec(four), "s")
    spec = write_spec(tmp_path / "prod.yaml")
    r = run("status", "--json", "-f", str(spec), cwd=tmp_path)
    snap = json.loads(r.stdout)
    assert snap["removed_nodes"] == [{"node": "node4", "running": False}]


def test_a_node_address_or_etcd_port_cannot_change_under_a_cluster(tmp_path):
    state = StateDir(tmp_path / "state")
    state.claim(parse_spec(spec_data()), "s")
    moved = spec_data()
    moved["nodes"][1]["address"] = "127.0.0.88"
    moved["ports"]["etcd_peer"] = 2390
    with pytest.raises(UserError) as e:
        state.claim(parse_spec(moved), "s")
    assert any(d.startswith("nodes[1].address: node2 was created at 127.0.0.85") for d in e.value.details)
    assert any(d.startswith("ports.etcd_peer:") for d in e.value.details)


def test_a_damaged_record_is_an_error_not_a_guess(tmp_path):
    (tmp_path / RECORD_FILE).write_text("{ not json")
    with pytest.raises(UserError) as e:
        StateDir(tmp_path).record()
    assert "damaged" in e.value.message


def test_the_dag_folder_cannot_swallow_the_state(tmp_path):
    for dags, needle in ((".", "contains the state directory"), ("/", "is /"), (".haflow/x", "inside the state directory"),
                         ("missing", "not an existing folder")):
        (tmp_path / ".haflow" / "x").mkdir(parents=True, exist_ok=True)
        spec = write_spec(tmp_path / "prod.yaml", mutate=lambda d: d["airflow"].update(dags=dags))
        for cmd in ("validate", "up"):
            r = run(cmd, "-f", str(spec), cwd=tmp_path)
            assert r.returncode == 2 and "airflow.dags:" in r.stderr and needle in r.stderr, (dags, r.stderr)


def test_secrets_show_without_a_cluster_says_so(tmp_path):
    r = run("secrets", "show", "--state-dir", str(tmp_path / "none"), cwd=tmp_path)
    assert r.returncode == 2 and "no cluster" in r.stderr
    assert not (tmp_path / "none").exists()


def test_init_writes_atomically_and_a_full_disk_keeps_the_old_file(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], check=True)
    try:
        target = disk / "secrets.yaml"
        atomic_write(target, "old: content\n", 0o600)
        with pytest.raises(DiskFull) as e:
            atomic_write(target, "x" * 200_000, 0o600)
        assert "no space left" in e.value.message and "intact" in e.value.message
        assert target.read_text() == "old: content\n"
        assert [p.name for p in disk.iterdir()] == ["secrets.yaml"]  # no temporary file left
        (disk / "filler").write_bytes(b"\0" * 60_000)
        r = run("init", str(disk / "haflow.yaml"))
        assert r.returncode == 2 and "no space left" in r.stderr and "Traceback" not in r.stderr
        assert not (disk / "haflow.yaml").exists()
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_dag_folder_symlinks_are_copied_as_links(tmp_path):
    from haflow.fsutil import tree_checksum as folder_checksum
    from haflow.hosts.local import LocalHost

    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "a.py").write_text("x = 1\n")
    (dags / "etc").symlink_to("/etc")
    (dags / "passwd").symlink_to("/etc/passwd")
    host = LocalHost(tmp_path / "state", "prod")
    link = tmp_path / "node" / "dags"
    assert host.put_tree("node1", dags, folder_checksum(dags), link)
    assert (link / "etc").is_symlink() and os.readlink(link / "etc") == "/etc"
    assert (link / "passwd").is_symlink()
    assert folder_checksum(link) == folder_checksum(dags)
    (dags / "etc").unlink()
    (dags / "etc").symlink_to("/usr")
    assert folder_checksum(link) != folder_checksum(dags)  # a retargeted link is a change


def test_a_running_cluster_takes_new_workers_and_full_nodes_but_no_role_change(tmp_path):
    state = StateDir(tmp_path / "state")
    state.claim(parse_spec(spec_data()), "s")
    state.record_secrets(["postgres_airflow"])  # the cluster was created
    grown = spec_data()
    grown["nodes"].append({"name": "w1", "address": "127.0.0.87", "roles": ["worker"]})
    state.claim(parse_spec(grown), "s")  # a worker-only node joins a running cluster
    assert state.record().entries["w1"] == {"roles": ["worker"], "ssh": None}
    assert "w1" not in state.record().etcd and state.etcd_to_add() == []
    changed = spec_data()
    changed["nodes"].append({"name": "w1", "address": "127.0.0.87"})  # the worker made a full node
    with pytest.raises(UserError) as e:
        state.claim(parse_spec(changed), "s")
    assert any(d.startswith("nodes[3].roles: w1 was created as a worker-only node") for d in e.value.details), e.value.details
    full = spec_data()
    full["nodes"] += [{"name": "node4", "address": "127.0.0.88"}, {"name": "node5", "address": "127.0.0.89"}]
    full["etcd"]["members"] += ["node4", "node5"]
    state.claim(parse_spec(full), "s")  # two full nodes, both etcd members: added one after the other
    assert state.etcd_to_add() == ["node4", "node5"]


def test_new_etcd_members_are_marked_to_join_and_the_founders_files_keep_their_member_list(tmp_path):
    state = StateDir(tmp_path / "state")
    state.claim(parse_spec(spec_data()), "s")
    founders = ",".join(f"node{i + 1}=http://{a}:2380" for i, a in enumerate(ADDRESSES))
    assert state.record().etcd["node1"] == {"initial_cluster": founders, "state": "new"}
    state.record_secrets(["postgres_airflow"])  # the cluster was created
    grown = spec_data()
    grown["nodes"] += [{"name": "node4", "address": "127.0.0.88"}, {"name": "node5", "address": "127.0.0.89"}]
    grown["etcd"]["members"] += ["node4", "node5"]
    spec = parse_spec(grown)
    state.claim(spec, "s")
    assert state.etcd_to_add() == ["node4", "node5"]
    joins = state.etcd_joins(spec)
    assert joins["node1"].initial_cluster == founders and joins["node1"].state == "new"
    planned = founders + ",node4=http://127.0.0.88:2380,node5=http://127.0.0.89:2380"
    assert joins["node4"].state == "existing" and joins["node4"].initial_cluster == planned
    state.etcd_added("node4", "etcd's own list")  # what etcd's member API answered
    state.claim(spec, "s")  # a re-run: node4 is not added again, and etcd's answer is kept
    assert state.etcd_to_add() == ["node5"] and state.etcd_joins(spec)["node4"].initial_cluster == "etcd's own list"
    assert state.etcd_joins(spec)["node1"].initial_cluster == founders
    dropped = spec_data()
    dropped["nodes"] = grown["nodes"]
    dropped["etcd"]["members"] = ["node1", "node2", "node4"]
    with pytest.raises(UserError) as e:
        state.claim(parse_spec(dropped), "s")
    assert any(d.startswith("etcd.members: node3 is an etcd member of the running cluster") for d in e.value.details)


def test_a_record_from_before_etcd_bookkeeping_counts_its_nodes_as_founders(tmp_path):
    state = StateDir(tmp_path / "state")
    state.claim(parse_spec(spec_data()), "s")
    state.record_secrets(["postgres_airflow"])
    old = json.loads(state.record_path.read_text())
    del old["etcd"]
    state.record_path.write_text(json.dumps(old))
    grown = spec_data()
    grown["nodes"] += [{"name": "node4", "address": "127.0.0.88"}, {"name": "node5", "address": "127.0.0.89"}]
    grown["etcd"]["members"] += ["node4", "node5"]
    state.claim(parse_spec(grown), "s")
    assert state.etcd_to_add() == ["node4", "node5"]
    assert state.record().etcd["node3"]["state"] == "new" and "node4" not in state.record().etcd["node3"]["initial_cluster"]


def test_the_record_keeps_how_a_server_is_reached_with_absolute_paths(tmp_path):
    data = spec_data()
    for n in data["nodes"]:
        n["ssh"] = {"user": "admin", "key": "keys/id", "known_hosts": "known"}
    StateDir(tmp_path / "state").claim(parse_spec(data), "s", spec_dir=tmp_path / "spec")
    entry = StateDir(tmp_path / "state").record().entries["node2"]
    assert entry["ssh"] == {"host": "127.0.0.85", "user": "admin", "port": 22, "key": str(tmp_path / "spec/keys/id"),
                            "known_hosts": str(tmp_path / "spec/known")}
    assert entry["roles"] == ["database", "broker", "airflow", "worker"]
