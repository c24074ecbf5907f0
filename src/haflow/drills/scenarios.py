"""The faults a drill injects: a real SIGKILL through the host's fault verbs, a server powered
off hard or cut off the network through the spec's out-of-band control (drills/control.py), or,
for `switchover`, the planned operation; on the node where it hurts most unless `--node` says
otherwise.

A scenario picks its victim (`pick`) and strikes (`strike`); the strike returns a `Fault`
telling the runner what came back by itself and what must be brought back (a crashed node
stays down until its machine boots again and `haflow up` runs, as a dead machine would).
`took_effect` then checks that the fault changed what it claims: a drill whose fault did
nothing proves nothing and fails.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from haflow.cluster import Cluster
from haflow.components import airflow, etcd, patroni, postgres, rabbitmq
from haflow.drills import control
from haflow.errors import ClusterUnhealthy
from haflow.hosts.base import Instance
from haflow.spec import Spec


class BrokerWatch(threading.Thread):
    """broker-partition, from the cut on: when the other side first saw the cut-off RabbitMQ
    as down, when it paused (pause_minority: it closes its AMQP listener), and when a node on
    the other side first named another queue leader. Times are wall-clock, None until seen."""

    def __init__(self, cluster: Cluster, victim: str) -> None:
        super().__init__(daemon=True, name="haflow-broker-watch")
        self.cluster, self.victim = cluster, victim
        self.cut_seen: float | None = None
        self.paused: float | None = None
        self.leader_moved: tuple[float, str] | None = None
        self.halt = threading.Event()

    @property
    def done(self) -> bool:
        return None not in (self.cut_seen, self.paused, self.leader_moved)

    def run(self) -> None:
        facts, secrets = self.cluster.facts, self.cluster.secrets
        victim = facts.node(self.victim)
        others = [n for n in facts.broker_nodes if n.name != self.victim]
        while not self.halt.is_set() and not self.done:
            if self.paused is None and not rabbitmq.accepts_amqp(victim):
                self.paused = time.time()
            for other in others:
                view = rabbitmq.seen_by(facts, secrets, other, airflow.QUEUE)
                if view is None:
                    continue
                running, leader = view
                if self.cut_seen is None and running.get(self.victim) is False:
                    self.cut_seen = time.time()
                if self.leader_moved is None and leader not in (None, self.victim):
                    self.leader_moved = (time.time(), leader)
            self.halt.wait(0.5)


@dataclass(frozen=True)
class Fault:
    node: str
    what: str  # one line for the timeline, e.g. "SIGKILL Patroni and PostgreSQL on node1"
    service: str | None = None  # the service whose init restarts it (None: node held down)
    killed: tuple[Instance, ...] = ()  # the instances the strike killed
    held_down: bool = False  # the node stays down until the runner brings it back
    switched_to: str | None = None  # switchover: the node that must now be the primary
    powered_off: bool = False  # the server itself is off (power control), not only its services
    isolated: bool = False  # the server is cut off the network (held, then healed)
    broker_isolated: bool = False  # only its RabbitMQ is cut off from the other RabbitMQ nodes
    broker_watch: BrokerWatch | None = None  # broker_isolated: what the other side saw, from the cut on


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    pick: Callable[[Cluster], str]  # the default victim node
    strike: Callable[[Cluster, str], Fault]
    watch_broker: bool = False
    needs: tuple[str, ...] = ()  # the nodes[].control actions the drill cannot run without


def _primary(cluster: Cluster) -> str:
    leader = patroni.probe(cluster.facts).leader
    if leader is None:
        raise ClusterUnhealthy("no database primary to strike; run `haflow status`")
    return leader


def _etcd_leader(cluster: Cluster) -> str:
    leader = etcd.leader_name(cluster.facts)
    if leader is None:
        raise ClusterUnhealthy("etcd has no leader; run `haflow status`")
    return leader


def _queue_leader(cluster: Cluster) -> str:
    leader = rabbitmq.queue_leader(cluster.facts, cluster.secrets, airflow.QUEUE)
    if leader is None:
        raise ClusterUnhealthy(f"the broker's {airflow.QUEUE!r} queue has no leader; run `haflow status`")
    return leader


def _busiest_worker(cluster: Cluster) -> str:
    """The node whose worker runs the most task instances right now (waits up to 30 s for one)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            with postgres.connect_any(cluster.facts, cluster.secrets) as conn:
                row = conn.execute("SELECT hostname FROM task_instance WHERE state = 'running' AND hostname <> ''"
                                   " GROUP BY hostname ORDER BY count(*) DESC LIMIT 1").fetchone()
            if row and row[0] in cluster.facts.node_names:
                return row[0]
        except (ClusterUnhealthy, psycopg.OperationalError):
            pass
        if time.monotonic() > deadline:
            raise ClusterUnhealthy("no task is running on any worker; is the canary DAG being scheduled?")
        time.sleep(0.3)


def _first_node(cluster: Cluster) -> str:
    """The first node running Airflow's control plane (scheduler, api-server)."""
    return cluster.facts.airflow_nodes[0].name


def _kill(service: str, label: str) -> Callable[[Cluster, str], Fault]:
    """A crash of one service (and what it forked: Patroni's PostgreSQL dies with it)."""
    def strike(cluster: Cluster, node: str) -> Fault:
        killed = cluster.host.kill_service(node, service)
        return Fault(node, f"SIGKILL {label} on {node}", service=service, killed=tuple(killed))
    return strike


def _crash_node(cluster: Cluster, node: str) -> Fault:
    """A server with power control is powered off hard; otherwise every service of the node
    is SIGKILLed (a local node: its supervisord and everything under it)."""
    if control.can(cluster.spec, node, control.POWER):
        control.run(cluster.spec, node, "power_off")
        return Fault(node, f"{node} powered off hard (nodes[].control.power_off), held down", held_down=True,
                     powered_off=True)
    count = cluster.host.kill_node(node)
    return Fault(node, f"SIGKILL every process of {node} ({count}), held down", held_down=True)


def _partition(cluster: Cluster, node: str) -> Fault:
    control.run(cluster.spec, node, "isolate")  # run_drill checked the spec has it
    return Fault(node, f"{node} cut off from every other server and from this machine", isolated=True)


def _partition_broker(cluster: Cluster, node: str) -> Fault:
    control.run(cluster.spec, node, "isolate_broker")  # run_drill checked the spec has it
    watch = BrokerWatch(cluster, node)
    watch.start()
    return Fault(node, f"{node}'s RabbitMQ cut off from the other RabbitMQ nodes (epmd and distribution ports: "
                       f"{control.broker_ports(cluster.spec)})", broker_isolated=True, broker_watch=watch)


def _switchover(cluster: Cluster, node: str) -> Fault:
    """`node` is the primary (the default) or, given with --node, the node to switch to."""
    result = cluster.switchover(to=None if node == _primary(cluster) else node)
    return Fault(result["from"], f"planned switchover {result['from']} -> {result['to']} done in {result['elapsed_s']} s",
                 switched_to=result["to"])


def took_effect(cluster: Cluster, fault: Fault) -> tuple[bool, str]:
    """Whether the fault changed what it claims, checked right after the strike: a killed
    service's instance is gone or replaced, a crashed node has no process left, a switchover
    moved the primary. Returns (ok, why not)."""
    host = cluster.host
    if fault.broker_isolated:
        # a cut RabbitMQ link shows only once the other nodes' net_ticktime runs out
        wait_s = 4 * cluster.spec.broker.net_ticktime_s + 30
        deadline = time.monotonic() + wait_s
        while fault.broker_watch is not None and fault.broker_watch.cut_seen is None and time.monotonic() < deadline:
            time.sleep(0.5)
        if fault.broker_watch is None or fault.broker_watch.cut_seen is None:
            return False, f"no other RabbitMQ node saw {fault.node}'s RabbitMQ as down within {wait_s} s of the cut"
        return True, ""
    if fault.powered_off or fault.isolated:
        if control.answers(cluster.spec, fault.node):
            return False, f"{fault.node} still answers on its SSH port after {'the power-off' if fault.powered_off else 'the cut'}"
        return True, ""
    if fault.held_down:
        left = host.leftovers(fault.node, timeout=0)
        if host.running(fault.node) or left:
            return False, f"{fault.node} still runs after the crash ({', '.join(left) or 'its init is up'})"
        return True, ""
    if fault.switched_to is not None:
        leader = patroni.probe(cluster.facts).leader
        return (leader == fault.switched_to,
                f"the primary is {leader or 'none'}, not {fault.switched_to}, after the switchover")
    if fault.service is not None:
        if not fault.killed:
            return False, f"no instance of {fault.service} on {fault.node} was killed"
        now = host.instance(fault.node, fault.service)
        if now is not None and now in fault.killed:
            return False, f"{fault.service} on {fault.node} still runs as the instance the fault claims it killed ({now.id})"
        return True, ""
    return False, "the fault names neither a service, a node nor a switchover"


SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    Scenario("db-primary-crash", "the primary's Patroni and PostgreSQL die; the node stays up", _primary,
             _kill(patroni.NAME, "Patroni and PostgreSQL")),
    Scenario("node-crash", "every process of the primary's node dies and stays down, then the node is brought back",
             _primary, _crash_node, watch_broker=True),
    Scenario("node-partition", "the primary's server is cut off from every other server and this machine, then healed",
             _primary, _partition, watch_broker=True, needs=control.NETWORK),
    Scenario("broker-partition", "the RabbitMQ node leading the task queue is cut off from the other RabbitMQ nodes, "
             "then healed", _queue_leader, _partition_broker, watch_broker=True, needs=control.BROKER_NETWORK),
    Scenario("broker-node-crash", "the RabbitMQ node leading the task queue dies", _queue_leader,
             _kill(rabbitmq.NAME, "RabbitMQ"), watch_broker=True),
    Scenario("scheduler-crash", "one scheduler dies", _first_node, _kill(airflow.SCHEDULER, "the scheduler")),
    Scenario("api-server-crash", "one api-server dies", _first_node, _kill(airflow.API, "the api-server")),
    Scenario("worker-crash", "the Celery worker running the most tasks dies with them", _busiest_worker,
             _kill(airflow.WORKER, "the Celery worker and its running tasks")),
    Scenario("etcd-leader-crash", "the etcd member leading the DCS dies", _etcd_leader, _kill(etcd.NAME, "etcd")),
    Scenario("switchover", "a planned primary change through Patroni", _primary, _switchover),
]}
ALL = list(SCENARIOS)


def runnable(spec: Spec) -> list[str]:
    """The scenarios the spec's nodes can undergo (node-partition and broker-partition need
    network control on every full node: their victims are the primary's and the queue leader's)."""
    return [name for name, sc in SCENARIOS.items() if all(control.can(spec, n.name, sc.needs) for n in spec.full_nodes)]
