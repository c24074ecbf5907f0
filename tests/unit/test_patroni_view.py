"""Which Patroni view `status` and the gates believe: a member back from a partition answers
/cluster from its stale copy of the DCS (naming itself leader) until its next loop."""

import yaml

from haflow.components import etcd, patroni
from haflow.facts import ClusterFacts
from haflow.spec import default_spec_text, parse_spec


def view(leader: str) -> dict:
    return {"members": [{"name": n, "role": "leader" if n == leader else "replica",
                         "state": "running" if n == leader else "streaming"} for n in ("node1", "node2", "node3")]}


def test_the_view_that_agrees_with_the_leader_key_wins_over_a_stale_one(monkeypatch):
    facts = ClusterFacts(parse_spec(yaml.safe_load(default_spec_text())))
    views = {"node1": view("node1"), "node2": view("node2"), "node3": view("node2")}  # node1 just healed
    monkeypatch.setattr(patroni, "_view_of", lambda node, timeout: views[node.name])
    monkeypatch.setattr(etcd, "get_key", lambda facts, key, timeout=2.0: "node2" if key == "/haflow/haflow/leader" else None)
    assert patroni.probe(facts).leader == "node2"
    # etcd does not answer: the first view there is (what there is to go on)
    monkeypatch.setattr(etcd, "get_key", lambda facts, key, timeout=2.0: None)
    assert patroni.probe(facts).leader == "node1"
    # no view agrees (every member stale): still the first, not nothing
    monkeypatch.setattr(etcd, "get_key", lambda facts, key, timeout=2.0: "node3")
    assert patroni.probe(facts).leader == "node1"
