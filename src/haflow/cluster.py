"""Orchestration: bring layers up in order behind health gates, and down in reverse.

Start: etcd -> Patroni (gate: leader + N-1 streaming, one sync standby) -> HAProxy (gate: every
balancer routes its primary port to the leader) -> the airflow role and database.
Stop: HAProxy -> Patroni replicas -> Patroni leader -> etcd followers -> etcd leader
(followers first: stopping all members at once stalls 7 s on leadership transfer).
"""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from haflow import prereqs
from haflow.components import etcd, haproxy, patroni, postgres
from haflow.components.base import DesiredState
from haflow.errors import ClusterUnhealthy, UserError
from haflow.facts import ClusterFacts
from haflow.hosts.local import LocalHost
from haflow.procs import ProcRef, wait_gone
from haflow.secrets import Secrets
from haflow.spec import Spec

Say = Callable[[str], None]

ETCD_TIMEOUT_S = 60
DATABASE_TIMEOUT_S = 180
BALANCER_TIMEOUT_S = 30


def _quiet(_: str) -> None:
    pass


class Cluster:
    def __init__(self, spec: Spec, state_dir: Path, say: Say = _quiet) -> None:
        self.spec = spec
        self.facts = ClusterFacts(spec)
        self.state_dir = state_dir
        self.host = LocalHost(state_dir, spec.cluster)
        self.say = say
        self._secrets: Secrets | None = None

    @property
    def secrets(self) -> Secrets:
        if self._secrets is None:
            self._secrets = Secrets.load_or_create(self.state_dir)
        return self._secrets

    def exists(self) -> bool:
        return (self.state_dir / "nodes").is_dir()

    # --- desired state ------------------------------------------------------------------------
    def desired(self, node: str) -> DesiredState:
        n = self.facts.node(node)
        layout = self.host.layout(node)
        state = DesiredState()
        state.extend(etcd.render(self.facts, n, layout))
        state.extend(patroni.render(self.facts, n, layout, self.secrets))
        state.extend(haproxy.render(self.facts, n, layout))
        return state

    # --- up -----------------------------------------------------------------------------------
    def up(self) -> dict[str, Any]:
        """Bring every layer up (or back) in order; idempotent. Returns what changed."""
        t0 = time.monotonic()
        changed: list[str] = []
        changed += self.ensure_prerequisites()
        problems = [p for n in self.facts.node_names
                    for p in self.host.preflight(n, self.facts.node(n).address, self.facts.listen_ports(n))]
        if problems:
            raise UserError(f"cannot start the cluster here: {len(problems)} problem(s)", details=problems)

        file_changes: dict[str, list[Path]] = {}
        for node in self.facts.node_names:
            file_changes[node] = self.host.apply(node, self.desired(node)).files
            changed += [str(p) for p in file_changes[node]]
        for node in self.facts.node_names:
            if self.host.ensure_agent(node):
                changed.append(f"{node}: started supervisor")

        self.say("starting etcd")
        changed += self._ensure_service(etcd.NAME, [n.name for n in self.facts.etcd_members], file_changes)
        self._wait("etcd quorum (all members healthy, a leader)", ETCD_TIMEOUT_S, lambda: etcd.probe(self.facts))

        self.say("starting Patroni")
        changed += self._ensure_service(patroni.NAME, self.facts.node_names, file_changes, reload_signal="HUP")
        db = self._wait(
            f"database (a leader, {len(self.facts.nodes) - 1} streaming replicas"
            + (", a synchronous standby)" if self.spec.database.synchronous_mode else ")"),
            DATABASE_TIMEOUT_S,
            lambda: patroni.probe(self.facts),
        )

        patch = patroni.reconcile_dynamic_config(self.facts, self.secrets, self.facts.node(db["leader"]))
        if patch:
            changed.append(f"updated Patroni's cluster config: {', '.join(sorted(_flat_keys(patch)))}")

        self.say("starting HAProxy")
        changed += self._ensure_service(haproxy.NAME, self.facts.node_names, file_changes)
        self._wait(
            "balancers (every node's primary port routes to the leader)",
            BALANCER_TIMEOUT_S,
            lambda: haproxy.probe(self.facts, patroni.probe(self.facts)["leader"]),
        )

        leader = self.facts.node(db["leader"])
        changed += postgres.ensure_airflow_database(self.facts, self.secrets, leader.pg_primary)
        moved = etcd.move_leader_away(self.facts, leader.name)
        if moved:
            changed.append(f"moved etcd leadership from {leader.name} to {moved} (off the primary's node)")
        return {"changed": changed, "elapsed_s": round(time.monotonic() - t0, 1)}

    def ensure_prerequisites(self) -> list[str]:
        """Distro packages and runtime venvs; returns what was installed (nothing on a re-run)."""
        self.say("checking prerequisites")
        changed = [f"installed {p}" for p in prereqs.ensure_system(self.spec, self.say)]
        layout = self.host.layout(self.facts.node_names[0])
        venv = patroni.venv_dir(layout, self.spec.database.patroni_version)
        if prereqs.ensure_venv(venv, [patroni.requirement(self.spec.database.patroni_version)], self.say):
            changed.append(f"built {venv}")
        prereqs.check_traversable(venv, layout.db_user)
        return changed

    def _ensure_service(
        self, service: str, nodes: list[str], file_changes: dict[str, list[Path]], reload_signal: str | None = None
    ) -> list[str]:
        done = []
        for node in nodes:
            spec = next(s for s in self.desired(node).services if s.name == service)
            stale = any(p in spec.restart_files for p in file_changes.get(node, []))
            if self.host.start(node, service):
                done.append(f"{node}: started {service}")
            elif stale:
                if reload_signal:
                    self.host.signal(node, service, getattr(signal, f"SIG{reload_signal}"))
                    done.append(f"{node}: reloaded {service}")
                else:
                    self.host.restart(node, service)
                    done.append(f"{node}: restarted {service}")
        return done

    def _wait(self, what: str, timeout: float, probe: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        self.say(f"waiting for {what}")
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            last = probe()
            if last.get("healthy"):
                return last
            time.sleep(0.5)
        why = "; ".join(last.get("problems", [])) or _unhealthy_members(last)
        raise ClusterUnhealthy(
            f"timed out after {timeout:.0f}s waiting for {what}: {why}; data is kept, check the logs under "
            f"{self.state_dir}/nodes/*/logs and re-run `haflow up`"
        )

    # --- down ---------------------------------------------------------------------------------
    def down(self) -> dict[str, Any]:
        """Orderly stop of every node; data kept. Returns the processes that were stopped."""
        t0 = time.monotonic()
        nodes = self.facts.node_names
        before = [r for n in nodes for r in self.host.processes(n)]
        self.say("stopping HAProxy")
        self._parallel(lambda n: self.host.stop(n, haproxy.NAME), nodes)

        self.say("stopping Patroni (replicas first, then the leader)")
        leader = patroni.probe(self.facts)["leader"]
        self._parallel(lambda n: self.host.stop(n, patroni.NAME), [n for n in nodes if n != leader])
        if leader:
            self.host.stop(leader, patroni.NAME)
        self._parallel(self.host.reap_leftovers, nodes)

        self.say("stopping etcd (followers first, then the leader)")
        etcd_leader = etcd.leader_name(self.facts, timeout=1.0)
        members = [n.name for n in self.facts.etcd_members]
        self._parallel(lambda n: self.host.stop(n, etcd.NAME), [n for n in members if n != etcd_leader])
        if etcd_leader:
            self.host.stop(etcd_leader, etcd.NAME)

        self.say("stopping supervisors")
        self._parallel(self.host.stop_agent, nodes)
        left = wait_gone(before, 10)
        if left:
            raise ClusterUnhealthy(f"processes still running after down: {', '.join(f'{r.label}[{r.pid}]' for r in left)}")
        return {"stopped_processes": len(before), "elapsed_s": round(time.monotonic() - t0, 1)}

    @staticmethod
    def _parallel(fn: Callable[[str], Any], nodes: list[str]) -> None:
        with ThreadPoolExecutor(max_workers=max(1, len(nodes))) as pool:
            list(pool.map(fn, nodes))

    def purge(self) -> None:
        if any(self.host.node_up(n) or self.host.processes(n) for n in self.facts.node_names):
            raise UserError("the cluster is still running; run `haflow down` first, then `haflow down --purge --yes`")
        self.host.purge()

    # --- faults (used by tests, benchmarks and later by drills) --------------------------------
    def kill_node(self, node: str) -> list[ProcRef]:
        self.facts.node(node)
        return self.host.kill_node(node)


def _flat_keys(d: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += _flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return out


def _unhealthy_members(status: dict[str, Any]) -> str:
    bad = [m.get("node", "?") for m in status.get("members", []) if not m.get("healthy", True)]
    return f"not healthy: {', '.join(bad)}" if bad else "not healthy yet"
