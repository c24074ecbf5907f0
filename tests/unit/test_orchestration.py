"""`up`'s order and health gates, run against a host that only records what it is told.

The RecordingHost implements the host contract (hosts/base.py) in memory; the layers' probes
answer from what it started, as the real servers would: etcd is healthy once every member
runs, the database once etcd is healthy and every Patroni runs, and so on. So a layer started
before the one it depends on, or a gate not waited for, shows up as a wrong order or a start
that should not have happened. The drills' fault checks run against the same host.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from haflow import cluster as cluster_mod
from haflow.cluster import Cluster
from haflow.components import airflow, airflow_api, etcd, haproxy, patroni, pgbouncer, postgres, rabbitmq
from haflow.components.base import DesiredState, LayerStatus, Needs
from haflow.drills import scenarios
from haflow.drills.scenarios import Fault
from haflow.errors import ClusterUnhealthy, UserError
from haflow.facts import NodeLayout
from haflow.fsutil import tree_checksum
from haflow.hosts.base import Change, Host, Instance, Machine, Say, Target
from haflow.spec import default_spec_text, parse_spec

AIRFLOW_SERVICES = (airflow.API, airflow.SCHEDULER, airflow.DAG_PROCESSOR, airflow.TRIGGERER, airflow.WORKER)


class RecordingHost:
    kind = "recording"

    def recovery_hint(self) -> str:
        return "re-run"

    def __init__(self, root: Path, nodes: tuple[str, ...]) -> None:
        self.root = root
        self.nodes = nodes
        self.calls: list[tuple[str, ...]] = []
        self.up: dict[str, int] = {}  # "target/service" -> instance number
        self.booted: set[str] = set()
        self.counter = 0
        self.ignore_kills = False  # a broken host: kill verbs change nothing
        self.trees: dict[tuple[str, Path], str] = {}

    @staticmethod
    def _name(target: Target) -> str:
        return f"machine:{target.name}" if isinstance(target, Machine) else target

    def layout(self, node: str) -> NodeLayout:
        base = self.root / node
        return NodeLayout(root=base, services=base, db_root=base / "pg", run=base / "run", logs=base / "logs",
                          venvs=self.root / "venvs", db_user="postgres", task_logs=self.root / "task-logs",
                          serve_task_logs=True)

    def machine_layout(self, machine: Machine) -> NodeLayout:
        return self.layout("_machine")

    def machines(self) -> list[Machine]:
        return [Machine("m", self.nodes)]

    def preflight(self, target: Target, listen: dict[tuple[str, int], str]) -> list[str]:
        return []

    def missing(self, machine: Machine, needs: Needs) -> list[str]:
        return []

    def provision(self, machine: Machine, needs: Needs, say: Say) -> list[str]:
        self.calls.append(("provision", machine.name, *sorted(p.apt for p in needs.packages)))
        return []

    def plan(self, target: Target, desired: DesiredState) -> list[Change]:
        return []

    def apply(self, target: Target, desired: DesiredState) -> list[Path]:
        self.calls.append(("apply", self._name(target)))
        return []

    def boot(self, target: Target) -> bool:
        name = self._name(target)
        if name in self.booted:
            return False
        self.booted.add(name)
        return True

    def start(self, target: Target, service: str) -> bool:
        key = f"{self._name(target)}/{service}"
        if key in self.up:
            return False
        self.counter += 1
        self.up[key] = self.counter
        self.calls.append(("start", self._name(target), service))
        return True

    def stop(self, target: Target, service: str) -> None:
        self.up.pop(f"{self._name(target)}/{service}", None)
        self.calls.append(("stop", self._name(target), service))

    def restart(self, target: Target, service: str) -> None:
        self.stop(target, service)
        self.start(target, service)

    def reload(self, target: Target, service: str) -> bool:
        self.calls.append(("reload", self._name(target), service))
        return True

    def instance(self, target: Target, service: str) -> Instance | None:
        n = self.up.get(f"{self._name(target)}/{service}")
        return Instance(self._name(target), service, str(n)) if n else None

    def stale(self, target: Target) -> list[str]:
        return []

    def changed_since_start(self, target: Target, service: str, paths: tuple[Path, ...]) -> bool:
        return False

    def run(self, node: str, argv: list[str], env: dict[str, str], timeout: float = 600,
            user: str | None = None, cwd: Path | None = None) -> tuple[int, str]:
        self.calls.append(("run", node, *argv[-2:]))
        return 0, "ok"

    def put_tree(self, node: str, source: Path, checksum: str, dest: Path, owner: str | None = None) -> bool:
        self.calls.append(("put_tree", node))
        assert checksum == tree_checksum(source)
        had = self.trees.get((node, dest))
        self.trees[(node, dest)] = checksum
        return had != self.trees[(node, dest)]

    def tree_checksum(self, node: str, dest: Path) -> str | None:
        return self.trees.get((node, dest))

    def kill_service(self, node: str, service: str) -> list[Instance]:
        killed = self.instance(node, service)
        if not self.ignore_kills:
            self.up.pop(f"{node}/{service}", None)
            self.start(node, service)  # its init restarts it: a new instance
        return [killed] if killed else []

    def kill_node(self, target: Target) -> int:
        name = self._name(target)
        if self.ignore_kills:
            return 0
        self.booted.discard(name)
        for key in [k for k in self.up if k.startswith(f"{name}/")]:
            del self.up[key]
        return 1

    def running(self, target: Target) -> bool:
        return self._name(target) in self.booted

    def stop_node(self, target: Target) -> None:
        name = self._name(target)
        self.booted.discard(name)
        for key in [k for k in self.up if k.startswith(f"{name}/")]:
            del self.up[key]  # its init stops what still runs

    def leftovers(self, target: Target, timeout: float = 10.0) -> list[str]:
        name = self._name(target)
        return [k for k in self.up if k.startswith(f"{name}/")] if name not in self.booted else []

    def purge_node(self, node: str) -> None:
        self.calls.append(("purge_node", node))

    def purge(self) -> None:
        pass


def _everywhere(host: RecordingHost, service: str, nodes: list[str]) -> bool:
    return all(f"{n}/{service}" in host.up for n in nodes)


def _layers(host: RecordingHost, fail: str | None) -> dict[str, Any]:
    """Probes that answer from the recording host, as the servers would, about the full nodes of
    the facts they are given; `fail`: a layer that never becomes healthy."""
    def full(facts: Any) -> list[str]:
        return facts.names_with_role("database")

    def etcd_ok(facts: Any) -> bool:
        return fail != "etcd" and _everywhere(host, etcd.NAME, [n.name for n in facts.etcd_members])

    def db_ok(facts: Any) -> bool:
        return fail != "database" and etcd_ok(facts) and _everywhere(host, patroni.NAME, full(facts))

    def layer(ok: bool) -> LayerStatus:
        return LayerStatus(ok, () if ok else ("not yet",))

    def database(facts: Any) -> patroni.DatabaseStatus:
        ok = db_ok(facts)
        members = tuple(patroni.DbMember(n, "leader" if n == "node1" else "replica", "running" if n == "node1" else "streaming",
                                         0, 1, False) for n in full(facts))
        return patroni.DatabaseStatus(ok, () if ok else ("not yet",), "node1" if ok else None, members)

    def poolers(facts: Any) -> pgbouncer.PoolerStatus:
        ok = fail != "poolers" and _everywhere(host, pgbouncer.NAME, facts.node_names)
        members = tuple(pgbouncer.PoolerMember(n, ok, False, 0, 0, 0, None if ok else "not yet") for n in facts.node_names)
        return pgbouncer.PoolerStatus(ok, () if ok else ("not yet",), members)

    return {
        "etcd": lambda facts: layer(etcd_ok(facts)),
        "pgbouncer": lambda facts, secrets: poolers(facts),
        "etcd_leader": lambda facts, timeout=3.0: "node1" if etcd_ok(facts) else None,
        "patroni": database,
        "haproxy": lambda facts, secrets, leader: layer(fail != "balancers" and db_ok(facts)
                                                        and _everywhere(host, haproxy.NAME, full(facts))),
        "rabbitmq": lambda facts, secrets: layer(fail != "broker" and "machine:m/epmd" in host.up
                                                 and _everywhere(host, rabbitmq.NAME, full(facts))),
        "api_health": lambda node, timeout=3.0: {} if f"{node.name}/{airflow.API}" in host.up else None,
        "airflow": lambda facts, secrets, dags, endpoint: layer(
            fail != "airflow" and all(_everywhere(host, s, full(facts)) for s in AIRFLOW_SERVICES)),
    }


@pytest.fixture
def recorded(tmp_path, monkeypatch):
    """A Cluster on a RecordingHost, with the layers' probes answering from it."""
    def make(fail: str | None = None, extra: tuple[dict[str, Any], ...] = ()) -> tuple[Cluster, RecordingHost]:
        data = yaml.safe_load(default_spec_text())
        data["nodes"] += list(extra)
        spec = parse_spec(data)
        host = RecordingHost(tmp_path / "host", tuple(n.name for n in spec.nodes))
        assert isinstance(host, Host)  # the contract, checked structurally
        probes = _layers(host, fail)
        for module, attr, key in [(etcd, "probe", "etcd"), (etcd, "leader_name", "etcd_leader"),
                                  (patroni, "probe", "patroni"), (haproxy, "probe", "haproxy"), (pgbouncer, "probe", "pgbouncer"),
                                  (rabbitmq, "probe", "rabbitmq"), (airflow, "api_health", "api_health"),
                                  (airflow, "probe", "airflow")]:
            monkeypatch.setattr(module, attr, probes[key])
        # what `up` does inside the servers once their layer is healthy: nothing to record here
        monkeypatch.setattr(patroni, "reconcile_dynamic_config", lambda *a: {})
        monkeypatch.setattr(etcd, "ensure_auth", lambda *a: [])
        monkeypatch.setattr(etcd, "move_leader_away", lambda *a: None)
        monkeypatch.setattr(postgres, "ensure_airflow_database", lambda *a: [])
        monkeypatch.setattr(postgres, "airflow_schema_present", lambda *a: True)
        monkeypatch.setattr(postgres, "live_primary_endpoint", lambda facts: facts.nodes[0].pg_primary)
        monkeypatch.setattr(airflow_api, "login_works", lambda *a: True)
        monkeypatch.setattr(rabbitmq, "missing_replicas", lambda *a: {})
        monkeypatch.setattr(patroni, "wake_up", lambda *a: True)
        # a switchover's steps around Patroni's: the candidate is promoted when the (fake)
        # database says it leads
        monkeypatch.setattr(postgres, "checkpoint", lambda *a: True)
        monkeypatch.setattr(postgres, "await_writable", lambda *a: True)
        monkeypatch.setattr(pgbouncer, "pause_all", lambda facts, secrets, timeout_s: list(facts.node_names))
        monkeypatch.setattr(pgbouncer, "resume", lambda *a: [])
        monkeypatch.setattr(haproxy, "route_all_to", lambda *a: [])
        monkeypatch.setattr(patroni, "node_role", lambda node, path, timeout=1.0, client=None: path == "/primary" and any(
            m.node == node.name and m.role == "leader" for m in patroni.probe(facts_of[0]).members))
        facts_of: list[Any] = []
        for name in ("ETCD_TIMEOUT_S", "DATABASE_TIMEOUT_S", "BALANCER_TIMEOUT_S", "BROKER_TIMEOUT_S", "AIRFLOW_TIMEOUT_S"):
            monkeypatch.setattr(cluster_mod, name, 1.5)
        made = Cluster(spec, tmp_path / "state", host=host)
        facts_of.append(made.facts)
        return made, host
    return make


def _starts(host: RecordingHost) -> list[tuple[str, str]]:
    return [(c[1], c[2]) for c in host.calls if c[0] == "start"]


def test_up_starts_each_layer_after_the_one_it_depends_on(recorded):
    cluster, host = recorded()
    cluster.up(smoke=False)
    services = [s for _, s in _starts(host)]
    order = [etcd.NAME, patroni.NAME, haproxy.NAME, pgbouncer.NAME, rabbitmq.EPMD, rabbitmq.NAME, rabbitmq.GUARD, airflow.API, airflow.SCHEDULER,
             airflow.DAG_PROCESSOR, airflow.TRIGGERER, airflow.WORKER]
    assert sorted(set(services), key=order.index) == order
    last = {s: max(i for i, x in enumerate(services) if x == s) for s in order}
    first = {s: min(i for i, x in enumerate(services) if x == s) for s in order}
    for before, after in zip(order, order[1:]):
        assert last[before] < first[after], f"{after} started before every {before} had"
    assert (("machine:m", rabbitmq.EPMD)) in _starts(host)  # epmd is the machine's, not a node's
    # provisioning comes first and asks for every component's packages
    assert host.calls[0][:2] == ("provision", "m") and "etcd-server" in host.calls[0] and "haproxy" in host.calls[0]
    # the DAGs reached every node before the api-servers started
    puts = [i for i, c in enumerate(host.calls) if c[0] == "put_tree"]
    assert len(puts) == 3 and max(puts) < host.calls.index(("start", "node1", airflow.API))


def test_a_layer_that_never_gets_healthy_stops_up_before_the_next(recorded):
    cluster, host = recorded(fail="database")
    with pytest.raises(ClusterUnhealthy, match="database"):
        cluster.up(smoke=False)
    services = {s for _, s in _starts(host)}
    assert patroni.NAME in services and haproxy.NAME not in services and rabbitmq.NAME not in services


def test_the_broker_gate_holds_airflow_back(recorded):
    cluster, host = recorded(fail="broker")
    with pytest.raises(ClusterUnhealthy, match="broker"):
        cluster.up(smoke=False)
    assert not any(s.startswith("airflow") for _, s in _starts(host))


def test_a_second_up_starts_nothing(recorded):
    cluster, host = recorded()
    cluster.up(smoke=False)
    before = len(_starts(host))
    again = cluster.up(smoke=False)
    assert len(_starts(host)) == before and again["changed"] == []


def test_the_airflow_migration_runs_again_when_the_database_lost_it(recorded, monkeypatch):
    """A record on the control machine can outlive servers that were rebuilt: the migration is
    skipped only if the database has Alembic's version row too."""
    cluster, host = recorded()
    cluster.up(smoke=False)
    migrations = lambda: [c for c in host.calls if c[0] == "run" and c[-2:] == ("db", "migrate")]  # noqa: E731
    assert len(migrations()) == 1
    cluster.up(smoke=False)
    assert len(migrations()) == 1  # recorded, and the database has it: skipped
    monkeypatch.setattr(postgres, "airflow_schema_present", lambda *a: False)
    assert any("migrated the Airflow database" in c for c in cluster.up(smoke=False)["changed"])
    assert len(migrations()) == 2


def test_down_stops_replicas_before_the_leader_and_proves_nothing_is_left(recorded):
    cluster, host = recorded()
    cluster.up(smoke=False)
    host.calls.clear()
    cluster.down()
    stops = [(c[1], c[2]) for c in host.calls if c[0] == "stop"]
    patroni_stops = [n for n, s in stops if s == patroni.NAME]
    assert patroni_stops[-1] == "node1" and sorted(patroni_stops[:-1]) == ["node2", "node3"]
    assert [s for _, s in stops].index(patroni.NAME) > max(i for i, (_, s) in enumerate(stops) if s == haproxy.NAME)
    assert not any(host.running(n) for n in cluster.facts.node_names)


def test_down_stops_in_dependency_order_and_wakes_the_leader_while_its_standbys_stop(recorded, monkeypatch):
    """A synchronous standby's stop waits for the primary's next HA cycle: down wakes the
    leader up while the replicas stop. The rest keeps its order: the schedulers and workers
    before the api-servers, those before the balancers and the database, each partition guard
    before its RabbitMQ node, Patroni before etcd."""
    cluster, host = recorded()
    cluster.up(smoke=False)
    host.calls.clear()
    woken, plain_stop = [], host.stop

    def slow_replica_stop(target, service):
        if service == patroni.NAME and target != "node1":
            time.sleep(1.2)  # Patroni waiting to be released
        plain_stop(target, service)
    monkeypatch.setattr(host, "stop", slow_replica_stop)
    monkeypatch.setattr(patroni, "wake_up", lambda facts, secrets, node: woken.append(node) or True)
    cluster.down()
    stops = [(c[1], c[2]) for c in host.calls if c[0] == "stop"]
    first = lambda service: min(i for i, (_, s) in enumerate(stops) if s == service)  # noqa: E731
    last = lambda service: max(i for i, (_, s) in enumerate(stops) if s == service)  # noqa: E731
    assert woken and set(woken) == {"node1"}, woken
    for before, after in [(airflow.WORKER, airflow.API), (airflow.SCHEDULER, airflow.API), (airflow.API, pgbouncer.NAME),
                          (pgbouncer.NAME, haproxy.NAME),
                          (airflow.API, rabbitmq.GUARD), (haproxy.NAME, patroni.NAME), (patroni.NAME, etcd.NAME)]:
        assert last(before) < first(after), (before, after, stops)
    for node in cluster.facts.node_names:
        assert stops.index((node, rabbitmq.GUARD)) < stops.index((node, rabbitmq.NAME))


def test_down_fails_when_something_outlives_it(recorded):
    cluster, host = recorded()
    cluster.up(smoke=False)
    # a host whose stops do nothing: the inits go away, their services stay
    host.stop = lambda target, service: None
    host.stop_node = lambda target: host.booted.discard(host._name(target))
    with pytest.raises(ClusterUnhealthy, match="still running after down"):
        cluster.down()


# --- the drills' proof that a fault took effect ---------------------------------------------------


def test_a_killed_service_must_be_replaced(recorded):
    cluster, host = recorded()
    cluster.up(smoke=False)
    fault = scenarios._kill(airflow.SCHEDULER, "the scheduler")(cluster, "node2")
    assert scenarios.took_effect(cluster, fault) == (True, "")
    host.ignore_kills = True
    fault = scenarios._kill(airflow.SCHEDULER, "the scheduler")(cluster, "node2")
    ok, why = scenarios.took_effect(cluster, fault)
    assert not ok and "still runs as the instance the fault claims it killed" in why


def test_a_crashed_node_must_be_down(recorded):
    cluster, host = recorded()
    cluster.up(smoke=False)
    assert scenarios.took_effect(cluster, scenarios._crash_node(cluster, "node3")) == (True, "")
    cluster.up(smoke=False)
    host.ignore_kills = True
    ok, why = scenarios.took_effect(cluster, scenarios._crash_node(cluster, "node3"))
    assert not ok and "node3 still runs" in why


def test_a_fault_that_killed_nothing_did_not_take_effect(recorded):
    cluster, _ = recorded()
    ok, why = scenarios.took_effect(cluster, Fault("node1", "nothing", service=airflow.API))
    assert not ok and "no instance" in why


# --- probe results are frozen dataclasses; `status --json` keeps every key -----------------------

OLD_SCHEMA = {  # the keys `status --json` had before the probes became dataclasses (docs/status.md)
    "dcs": {"healthy", "leader", "cluster_version", "quota_bytes", "alarms", "members", "problems"},
    "database": {"healthy", "leader", "members", "problems"},
    "balancer": {"healthy", "endpoints", "members"},
    "broker": {"healthy", "members", "quorum_queues", "classic_queues", "endpoints", "problems"},
    "airflow": {"healthy", "api_servers", "schedulers", "triggerers", "dag_processors", "dag_processor_holder", "workers",
                "endpoints", "dags", "problems"},
}
MEMBER_KEYS = {
    "dcs": {"node", "healthy", "db_size_bytes"},
    "database": {"node", "role", "state", "lag_bytes", "timeline", "pending_restart"},
    "balancer": {"node", "healthy", "primary_up", "replicas_up", "amqp_up", "api_up", "reason"},
    "broker": {"node", "running", "alarms", "partitions"},
}


def test_layer_snapshots_are_frozen_and_keep_the_status_schema(tmp_path):
    import dataclasses

    spec = parse_spec(yaml.safe_load(default_spec_text()))
    from haflow.facts import ClusterFacts
    facts = ClusterFacts(spec)
    layers = {
        "dcs": etcd.EtcdStatus(True, (), "node1", "3.4.0", 1, (), (etcd.EtcdMember("node1", True, 4096),)),
        "database": patroni.DatabaseStatus(True, (), "node1", (patroni.DbMember("node1", "leader", "running", 0, 1, False),)),
        "balancer": haproxy.BalancerStatus.unknown(facts, "not created"),
        "broker": rabbitmq.BrokerStatus.unknown(facts, "not created"),
        "airflow": airflow.AirflowStatus.unknown(facts, {"agree": False}, "not created"),
    }
    for name, layer in layers.items():
        rendered = layer.to_json()
        assert OLD_SCHEMA[name] <= set(rendered), (name, OLD_SCHEMA[name] - set(rendered))
        if name in MEMBER_KEYS:
            assert set(rendered["members"][0]) == MEMBER_KEYS[name]
        assert isinstance(rendered["problems"], list)
        with pytest.raises(dataclasses.FrozenInstanceError):
            layer.healthy = True  # type: ignore[misc]
    assert layers["balancer"].unhealthy_nodes() == facts.node_names


def test_orchestration_status_and_drills_import_no_host_implementation():
    """cluster.py, status.py and drills/ reach hosts only through the contract (hosts/base.py,
    hosts.for_spec): importing the local host or its process references would let a PID leak in."""
    import ast

    src = Path(cluster_mod.__file__).parent
    forbidden = {"haflow.hosts.local", "haflow.hosts.procs", "haflow.hosts.local_provision", "haflow.procs", "psutil",
                 "supervisor", "haflow.hosts.ssh", "haflow.hosts.ssh_provision", "haflow.hosts.ssh_transport",
                 "haflow.hosts.wheelhouse", "asyncssh"}
    for path in [src / "cluster.py", src / "status.py", src / "dags.py", *sorted((src / "drills").glob("*.py"))]:
        tree = ast.parse(path.read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        bad = {m for m in imported if any(m == f or m.startswith(f + ".") for f in forbidden)}
        assert not bad, f"{path.name} imports {bad}"


WORKER_NODE = {"name": "w1", "address": "127.0.0.54", "roles": ["worker"]}


def test_a_worker_only_node_starts_its_balancer_and_worker_after_the_layers_it_needs(recorded):
    cluster, host = recorded(extra=(WORKER_NODE,))
    cluster.up(smoke=False)
    assert [s for n, s in _starts(host) if n == "w1"] == [haproxy.NAME, pgbouncer.NAME, airflow.WORKER]
    first_worker = host.calls.index(("start", "w1", airflow.WORKER))
    assert ("start", "node1", airflow.API) in host.calls[:first_worker]
    assert ("put_tree", "w1") in [c[:2] for c in host.calls]  # it gets the DAGs like every node


def test_node_remove_takes_a_worker_that_left_the_spec_and_refuses_anything_else(recorded, tmp_path):
    grown, host = recorded(extra=(WORKER_NODE,))
    grown.up(smoke=False)
    with pytest.raises(UserError, match="w1 is still in .*delete it from `nodes:` first"):
        grown.remove_node("w1")
    host.nodes = ("node1", "node2", "node3")  # the spec without w1, on the same servers and state
    cluster = Cluster(parse_spec(yaml.safe_load(default_spec_text())), tmp_path / "state", host=host)
    with pytest.raises(UserError, match="never a node of cluster"):
        cluster.check_removable("w9")
    with pytest.raises(UserError, match="node1 is still in"):
        cluster.check_removable("node1")
    assert cluster.state.removed_nodes(cluster.spec) == ["w1"]
    host.calls.clear()
    result = cluster.remove_node("w1")
    assert result["removed"] == "w1"
    drain, purge = host.calls.index(("stop", "w1", airflow.WORKER)), host.calls.index(("purge_node", "w1"))
    assert drain < purge and "w1" not in host.booted and not host.leftovers("w1")
    assert host.calls[purge + 1][0] != "purge_node" and any(c[0] == "apply" for c in host.calls[purge:])  # re-applied
    assert cluster.state.removed_nodes(cluster.spec) == [] and "w1" not in cluster.state.record().entries


def test_node_remove_hands_over_a_full_nodes_quorum_roles_before_it_deletes_anything(recorded, tmp_path, monkeypatch):
    forgotten: set[str] = set()
    monkeypatch.setattr(rabbitmq, "cluster_nodes", lambda facts, secrets: {
        facts.rabbit_node_name(n) for n in ("node1", "node2", "node3", "node4")} | ({"rabbit-node5@127.0.0.55"} - forgotten))
    grown, host = recorded(extra=({"name": "node4", "address": "127.0.0.54"}, {"name": "node5", "address": "127.0.0.55"}))
    grown.state.claim(grown.spec, "grown.yaml")  # what `up` records first
    grown.up(smoke=False)
    data = yaml.safe_load(default_spec_text())
    data["nodes"].append({"name": "node4", "address": "127.0.0.54"})
    data["etcd"]["members"] = ["node1", "node2", "node3"]
    host.nodes = ("node1", "node2", "node3", "node4")
    cluster = Cluster(parse_spec(data), tmp_path / "state", host=host)
    host.calls.clear()
    purge = host.purge_node

    def fails_once(node: str) -> None:  # the server went away right after the handover
        host.purge_node = purge
        forgotten.add("rabbit-node5@127.0.0.55")
        raise ClusterUnhealthy("node5: cannot reach it")

    host.purge_node = fails_once
    with pytest.raises(ClusterUnhealthy, match="node5: cannot reach it"):
        cluster.remove_node("node5")
    first = list(host.calls)
    host.calls.clear()
    assert cluster.remove_node("node5")["removed"] == "node5"  # the re-run picks up where it stopped
    assert ("run", "node1", "forget_cluster_node", "rabbit-node5@127.0.0.55") not in host.calls  # forgotten already
    host.calls[:0] = first
    order = [("stop", "node5", airflow.WORKER), ("stop", "node5", airflow.API),
             ("run", "node1", "shrink", "rabbit-node5@127.0.0.55"), ("stop", "node5", rabbitmq.NAME),
             ("run", "node1", "forget_cluster_node", "rabbit-node5@127.0.0.55"), ("stop", "node5", patroni.NAME),
             ("purge_node", "node5")]
    at = [host.calls.index(c) for c in order]
    assert at == sorted(at), host.calls
    assert "node5" not in cluster.state.record().entries and "node5" not in host.booted


def test_a_new_database_member_starts_after_the_running_ones_reloaded_their_pg_hba(recorded, tmp_path):
    cluster, host = recorded()
    cluster.up(smoke=False)
    data = yaml.safe_load(default_spec_text())
    data["nodes"].append({"name": "node4", "address": "127.0.0.54"})  # a full node; etcd keeps its 3 members
    host.nodes = ("node1", "node2", "node3", "node4")
    grown = Cluster(parse_spec(data), tmp_path / "state", host=host)
    host.calls.clear()
    grown.up(smoke=False)
    reloads = [host.calls.index(("reload", n, patroni.NAME)) for n in ("node1", "node2", "node3")]
    assert max(reloads) < host.calls.index(("start", "node4", patroni.NAME)), host.calls


def test_new_nodes_start_their_airflow_services_before_a_rolling_restart_waits_for_them(recorded, tmp_path, monkeypatch):
    """Growing etcd changes the dag-processor's elector file on the running nodes: their
    restart gate waits for every node's triggerer and worker, so the new nodes' must run by then."""
    cluster, host = recorded()
    cluster.up(smoke=False)
    data = yaml.safe_load(default_spec_text())
    data["nodes"] += [{"name": "node4", "address": "127.0.0.54"}, {"name": "node5", "address": "127.0.0.55"}]
    host.nodes = ("node1", "node2", "node3", "node4", "node5")
    monkeypatch.setattr(host, "stale", lambda node: [airflow.DAG_PROCESSOR] if node in ("node1", "node2", "node3") else [])
    monkeypatch.setattr(cluster_mod, "ROLLING_GATE_TIMEOUT_S", 1.5)
    grown = Cluster(parse_spec(data), tmp_path / "state", host=host)
    host.calls.clear()
    grown.up(smoke=False)
    first_restart = host.calls.index(("stop", "node1", airflow.DAG_PROCESSOR))
    for node in ("node4", "node5"):
        for service in (airflow.TRIGGERER, airflow.WORKER):
            assert host.calls.index(("start", node, service)) < first_restart
    assert [c[1] for c in host.calls if c[:1] == ("stop",) and c[2] == airflow.DAG_PROCESSOR] == ["node1", "node2", "node3"]


def test_nodes_that_left_together_leave_one_at_a_time_the_primarys_first(recorded, tmp_path, monkeypatch):
    """Two full nodes left the spec and one holds the primary: removing the other first is
    refused before anything is touched (the cluster without it would have its primary on a
    leaving node); the primary's node hands it to a node that stays, then the other leaves."""
    monkeypatch.setattr(rabbitmq, "cluster_nodes", lambda facts, secrets: {
        facts.rabbit_node_name(n) for n in facts.node_names})
    grown, host = recorded(extra=({"name": "node4", "address": "127.0.0.54"}, {"name": "node5", "address": "127.0.0.55"}))
    grown.up(smoke=False)
    primary = {"on": "node5"}

    def database(facts: Any) -> patroni.DatabaseStatus:
        names = facts.names_with_role("database")
        members = tuple(patroni.DbMember(n, "leader" if n == primary["on"] else "sync_standby" if n == "node2" else "replica",
                                         "running" if n == primary["on"] else "streaming", 0, 1, False)
                        for n in names if f"{n}/{patroni.NAME}" in host.up)
        leader = primary["on"] if any(m.node == primary["on"] for m in members) else None
        ok = leader is not None and len(members) == len(names)
        return patroni.DatabaseStatus(ok, () if ok else ("not yet",), leader, members)

    monkeypatch.setattr(patroni, "probe", database)
    monkeypatch.setattr(patroni, "request_switchover", lambda facts, secrets, leader, to: primary.update(on=to))
    host.nodes = ("node1", "node2", "node3")
    cluster = Cluster(parse_spec(yaml.safe_load(default_spec_text())), tmp_path / "state", host=host)
    host.calls.clear()
    with pytest.raises(UserError, match="the primary is on node5, which left the spec too; run `haflow node remove node5`"):
        cluster.remove_node("node4")
    assert not [c for c in host.calls if c[0] in ("stop", "run", "purge_node")], host.calls
    assert cluster.remove_node("node5")["removed"] == "node5"
    assert primary["on"] == "node2"  # the synchronous standby, a node that stays
    assert cluster.remove_node("node4")["removed"] == "node4"
    assert cluster.state.removed_nodes(cluster.spec) == [] and not host.leftovers("node4") and not host.leftovers("node5")


def test_node_remove_of_a_dead_server_drops_it_from_the_survivors_and_touches_nothing_there(recorded, tmp_path, monkeypatch):
    monkeypatch.setattr(rabbitmq, "cluster_nodes", lambda facts, secrets: {
        facts.rabbit_node_name(n) for n in ("node1", "node2", "node3", "node4")} | {"rabbit-node5@127.0.0.55"})
    grown, host = recorded(extra=({"name": "node4", "address": "127.0.0.54"}, {"name": "node5", "address": "127.0.0.55"}))
    grown.up(smoke=False)
    data = yaml.safe_load(default_spec_text())
    data["nodes"].append({"name": "node4", "address": "127.0.0.54"})
    host.nodes = ("node1", "node2", "node3", "node4")
    cluster = Cluster(parse_spec(data), tmp_path / "state", host=host)
    host.calls.clear()
    with pytest.raises(UserError, match="node5's server answers .* without --server-gone"):
        cluster.remove_node("node5", server_gone=True)
    assert host.calls == [] and "node5" in cluster.state.record().nodes
    host.kill_node("node5")  # powered off for good: over SSH, nothing can be proved about it
    monkeypatch.setattr(host, "leftovers", lambda target, timeout=10.0: ["node5: cannot reach it over SSH"])
    result = cluster.remove_node("node5", server_gone=True)
    assert result["removed"] == "node5" and result["server_touched"] is False
    assert not [c for c in host.calls if len(c) > 1 and c[1] == "node5"], host.calls  # nothing on its server
    assert ("run", "node1", "shrink", "rabbit-node5@127.0.0.55") in host.calls
    assert ("run", "node1", "forget_cluster_node", "rabbit-node5@127.0.0.55") in host.calls
    assert "node5" not in cluster.state.record().nodes and cluster.state.removed_nodes(cluster.spec) == []
