"""The drill's observer: polls who leads what, twice a second, and records every change as a
timeline event (database leader, etcd leader, where the balancers route the primary port, the
broker's queue leader, the victim's process coming back)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from haflow.cluster import Cluster
from haflow.components import airflow, etcd, haproxy, patroni, rabbitmq


@dataclass
class Timeline:
    events: list[tuple[float, str]] = field(default_factory=list)  # (time.time(), what)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, what: str, at: float | None = None) -> None:
        with self.lock:
            self.events.append((time.time() if at is None else at, what))


def _routes(cluster: Cluster) -> str | None:
    """The one node every answering balancer routes the primary port to, or None if they differ."""
    targets = set()
    for node in cluster.facts.nodes:
        states = haproxy.server_states(node, cluster.secrets, timeout=1.0)
        if states is not None:
            up = haproxy.up_servers(states, haproxy.PRIMARY_PROXY)
            targets.add(up[0] if len(up) == 1 else None)
    return targets.pop() if len(targets) == 1 else None


class Monitor(threading.Thread):
    """Records changes of each watched value; `watches` maps a label to a probe."""

    def __init__(self, cluster: Cluster, timeline: Timeline, broker: bool = False, interval_s: float = 0.5) -> None:
        super().__init__(daemon=True, name="haflow-monitor")
        self.timeline = timeline
        self.interval_s = interval_s
        facts = cluster.facts
        self.watches: dict[str, Callable[[], str | None]] = {
            "database primary": lambda: patroni.probe(facts).leader,
            "etcd leader": lambda: etcd.leader_name(facts, timeout=1.0),
            "balancers route writes to": lambda: _routes(cluster),
        }
        if broker:
            self.watches["broker queue leader"] = lambda: rabbitmq.queue_leader(facts, cluster.secrets, airflow.QUEUE)
        self.values: dict[str, str | None] = {}
        self._stopping = threading.Event()

    def prime(self) -> None:
        """Read the starting values (not events)."""
        for label, probe in self.watches.items():
            self.values[label] = self._read(probe)

    @staticmethod
    def _read(probe: Callable[[], str | None]) -> str | None:
        try:
            return probe()
        except Exception:  # a probe of a dying component: "unknown" until it answers again
            return None

    def run(self) -> None:
        while not self._stopping.wait(self.interval_s):
            for label, probe in self.watches.items():
                value = self._read(probe)
                if value != self.values.get(label):
                    self.timeline.add(f"{label}: {self.values.get(label) or 'none'} -> {value or 'none'}")
                    self.values[label] = value

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=10)
