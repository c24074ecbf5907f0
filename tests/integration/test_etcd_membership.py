"""Growing etcd under a running cluster, against real etcd processes: three founders, then two
members added one after the other through the member API (learner, then promoted), each booting
with the member list etcd answered, as `haflow deploy` does it. The founders' files never change.
Then one member removed, as `haflow node remove` does it.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from haflow.components import etcd
from haflow.facts import ClusterFacts, NodeLayout
from haflow.spec import default_spec_text, parse_spec
from haflow.statedir import StateDir

pytestmark = pytest.mark.integration

ADDRESSES = ["127.0.0.161", "127.0.0.162", "127.0.0.163", "127.0.0.164", "127.0.0.165"]
PORTS = {"etcd_client": 2479, "etcd_peer": 2480}  # away from any cluster's etcd


def spec_for(n: int):
    data = yaml.safe_load(default_spec_text())
    data["cluster"] = "etcdgrow"
    data["ports"].update(PORTS)
    data["nodes"] = [{"name": f"node{i + 1}", "address": a} for i, a in enumerate(ADDRESSES[:n])]
    data["etcd"]["members"] = [f"node{i + 1}" for i in range(n)]
    return parse_spec(data)


def layout(root: Path, node: str) -> NodeLayout:
    base = root / node
    return NodeLayout(root=base, services=base, db_root=base, run=base, logs=base, venvs=base, db_user="postgres",
                      task_logs=base, serve_task_logs=False)


class Members:
    """The etcd processes this test started (and only those are stopped)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, facts: ClusterFacts, name: str) -> Path:
        lay = layout(self.root, name)
        lay.services.mkdir(parents=True, exist_ok=True)
        conf = lay.services / "etcd.yaml"
        conf.write_text(yaml.safe_dump(etcd.config(facts, facts.node(name), lay)))
        log = open(lay.services / "etcd.log", "w")
        self.procs[name] = subprocess.Popen(["etcd", "--config-file", str(conf)], stdout=log, stderr=log)
        return conf

    def stop(self) -> None:
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            p.wait(timeout=20)


def voting_members(facts: ClusterFacts) -> dict[str, bool]:
    r = httpx.post(f"{facts.etcd_members[0].etcd_client_url}/v3/cluster/member/list", json={}, timeout=5)
    return {m.get("name", ""): bool(m.get("isLearner")) for m in r.json()["members"]}


def wait_healthy(facts: ClusterFacts, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if etcd.probe(facts).healthy:
            return
        time.sleep(0.5)
    raise AssertionError(f"etcd not healthy: {etcd.probe(facts).problems}")


def test_two_members_join_a_running_etcd_one_after_the_other(tmp_path):
    state = StateDir(tmp_path / "state")
    three = spec_for(3)
    state.claim(three, "s")
    state.record_secrets(["etcd_root"])  # the cluster runs from here on
    members = Members(tmp_path / "nodes")
    try:
        facts = ClusterFacts(three, state.etcd_joins(three))
        founder_files = {n: members.start(facts, n).read_text() for n in ("node1", "node2", "node3")}
        wait_healthy(facts)

        five = spec_for(5)
        state.claim(five, "s")
        assert state.etcd_to_add() == ["node4", "node5"]
        for name in ("node4", "node5"):
            facts = ClusterFacts(five, state.etcd_joins(five))
            state.etcd_added(name, etcd.add_learner(facts, facts.node(name)))
            assert etcd.learners(facts) == [name]  # added, not booted, no vote
            again = etcd.add_learner(facts, facts.node(name))  # a re-run does not add it twice
            assert again == state.record().etcd[name]["initial_cluster"]
            facts = ClusterFacts(five, state.etcd_joins(five))
            members.start(facts, name)
            assert name in etcd.promote_learners(facts, timeout=60)
        facts = ClusterFacts(five, state.etcd_joins(five))
        wait_healthy(facts)
        assert voting_members(facts) == {f"node{i}": False for i in range(1, 6)}
        assert state.etcd_to_add() == []
        # the founders' files as they were: a deploy would not restart them
        assert {n: yaml.safe_dump(etcd.config(facts, facts.node(n), layout(tmp_path / "nodes", n)))
                for n in founder_files} == founder_files
        node5 = etcd.config(facts, facts.node("node5"), layout(tmp_path / "nodes", "node5"))
        assert node5["initial-cluster-state"] == "existing" and node5["initial-cluster"].count("=") == 5

        # and back (what `node remove` does for a full node's member): stopped, then removed
        stopped = members.procs.pop("node5")
        stopped.terminate()
        stopped.wait(timeout=20)
        assert etcd.remove_member(facts, facts.node("node5"))
        assert not etcd.remove_member(facts, facts.node("node5"))  # a re-run finds it gone
        assert voting_members(facts) == {f"node{i}": False for i in range(1, 5)}
    finally:
        members.stop()
