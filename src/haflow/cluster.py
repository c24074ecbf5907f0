"""Orchestration: bring layers up in order behind health gates, and down in reverse.

Start: etcd -> Patroni (gate: leader + N-1 streaming, one sync standby) -> HAProxy (gate: every
balancer routes its primary port to the leader) -> RabbitMQ (epmd first) -> the airflow role and
database -> Airflow (api-servers, then schedulers, dag-processor candidates, triggerers, workers).
Stop: Airflow -> RabbitMQ -> HAProxy -> Patroni replicas -> Patroni leader -> etcd followers ->
etcd leader (followers first: stopping all members at once stalls 7 s on leadership transfer);
the nodes of one step stop in parallel.

Everything that runs goes through the cluster's host (hosts/base.py): this module never sees a
PID, a supervisor or a unit file.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, TypeVar

from haflow import hosts
from haflow.components import REGISTRY, airflow, airflow_api, etcd, haproxy, patroni, pgbouncer, postgres, rabbitmq
from haflow.applied import AppliedConfigs
from haflow.components.base import DesiredState, LayerStatus, Needs
from haflow.dags import Dags
from haflow.errors import ClusterUnhealthy, UserError
from haflow.facts import ClusterFacts
from haflow.hosts.base import Host, Machine, Target
from haflow.secrets import FILE_NAME as SECRETS_FILE
from haflow.secrets import Secrets
from haflow.spec import ROLES, WORKER_ONLY, Node, Spec
from haflow.statedir import StateDir

Say = Callable[[str], None]
L = TypeVar("L", bound=LayerStatus)

ETCD_TIMEOUT_S = 60
BROKER_TIMEOUT_S = 120
DATABASE_TIMEOUT_S = 180
BALANCER_TIMEOUT_S = 30
AIRFLOW_TIMEOUT_S = 180
EXAMPLE_DAG = "haflow_example"
EXAMPLE_TIMEOUT_S = 300
ROLLING_GATE_TIMEOUT_S = 180  # a restarted member must be back in its layer within this
DEAF_WORKER_S = 60  # a running Celery worker silent to pings this long during a gate is restarted


def _quiet(_: str) -> None:
    pass


class Cluster:
    def __init__(self, spec: Spec, state_dir: Path, say: Say = _quiet, spec_dir: Path | None = None,
                 source: str = "the spec", regenerate_secrets: bool = False, host: Host | None = None) -> None:
        self.spec = spec
        self.spec_dir = spec_dir or Path.cwd()
        self.source = source  # how errors name the spec (its path, or "the embedded default spec")
        self.state_dir = state_dir
        self.state = StateDir(state_dir)
        self.state.check_owner(spec, source)  # before anything reads or touches another cluster's files
        self.facts = self._read_facts()
        self.host = host or hosts.for_spec(spec, state_dir)
        self.dags = Dags(spec, self.spec_dir, state_dir, self.host)
        self.say = say
        self.regenerate_secrets = regenerate_secrets
        self._secrets: Secrets | None = None
        self.applied = AppliedConfigs(state_dir, self.host)
        self._stale: dict[str, set[str]] = {}  # per node: running services whose definition changed
        self.actions: dict[str, dict[str, list[str]]] = {}  # per node: files changed, services started/restarted

    def _read_facts(self) -> ClusterFacts:
        """The cluster's facts, with how each etcd member joined as the record has it."""
        return ClusterFacts(self.spec, self.state.etcd_joins(self.spec))

    @property
    def secrets(self) -> Secrets:
        """The cluster's secrets; an existing cluster whose secrets are gone is an error (exit 2)."""
        if self._secrets is None:
            self._secrets = Secrets.load(self.state_dir, self.state.generated_secrets(), self.state.has_cluster_data())
            etcd.use_root(self.facts, self._secrets)
        return self._secrets

    def ensure_secrets(self) -> list[str]:
        """Generate the secrets never generated for this cluster; record their names."""
        self._secrets, new = Secrets.ensure(self.state_dir, self.state.generated_secrets(),
                                            self.state.has_cluster_data(), self.regenerate_secrets)
        self.state.record_secrets(self._secrets.names())
        etcd.use_root(self.facts, self._secrets)
        return [f"generated secrets: {', '.join(new)} (stored 0600 in {self.state_dir / SECRETS_FILE})"] if new else []

    def exists(self) -> bool:
        return (self.state_dir / "nodes").is_dir()

    def removed_nodes_running(self) -> list[str]:
        """Nodes recorded here that left the spec but still run processes."""
        return [n for n in self.state.removed_nodes(self.spec) if self._alive(n)]

    def _alive(self, target: Target) -> bool:
        return self.host.running(target) or bool(self.host.leftovers(target, timeout=0))

    # --- desired state ------------------------------------------------------------------------
    def desired(self, node: str) -> DesiredState:
        n = self.facts.node(node)
        layout = self.host.layout(node)
        state = DesiredState()
        for component in REGISTRY:
            state.extend(component.render(self.facts, n, layout, self.secrets))
        return state

    # --- plan (a dry run) -------------------------------------------------------------------------
    def plan(self) -> dict[str, Any]:
        """What `up`/`deploy` would change on each node, changing nothing: per node the files
        (with a unified diff, secrets masked) and the services that would start or restart."""
        if not self.exists() and not (self.state_dir / SECRETS_FILE).exists():
            self._secrets = Secrets.placeholders()
            etcd.use_root(self.facts, self._secrets)
        self._preflight()
        out: dict[str, Any] = {}
        for node in self.facts.node_names:
            desired = self.desired(node)
            self.applied.expect(node, desired)
            changes = self.host.plan(node, desired, diff=True)
            for machine in self.host.machines():
                if node in machine.nodes:
                    changes += [c for c in self.host.plan(machine, rabbitmq.render_machine(
                        self.facts, self.host.machine_layout(machine), machine.nodes), diff=True) if c not in changes]
            paths = [c.path for c in changes]
            running = {s.name for s in desired.services if self.host.instance(node, s.name)}
            redefined = {c.service for c in changes if c.service}
            restart = [s.name for s in desired.services
                       if s.name in running and (s.name in redefined or self.applied.stale(node, s.name, paths))]
            out[node] = {"files": [{"path": str(c.path), "what": c.what, "diff": c.diff} for c in changes],
                         "start": sorted({s.name for s in desired.services} - running), "restart": restart}
        return out

    # --- up -----------------------------------------------------------------------------------
    def up(self, smoke: bool | None = None) -> dict[str, Any]:
        """Bring every layer up (or back) in order; idempotent. Returns what changed.

        smoke: run the example DAG at the end (None: only if something changed)."""
        t0 = time.monotonic()
        changed: list[str] = []
        # first: refuse another cluster's directory, record ours (and fix its mode before any
        # path decision is made from it)
        self.state.claim(self.spec, self.source, self.spec_dir)
        self.facts = self._read_facts()  # the claim records a new etcd member
        self._preflight()  # cheap, and bad input must fail before anything is installed
        changed += self.ensure_secrets()
        changed += self.ensure_prerequisites()
        for node in self.removed_nodes_running():
            self.say(f"{node} is no longer in the spec but still runs; `haflow node remove {node}` removes it")
            changed.append(f"{node}: not in the spec, still running (left alone; `haflow node remove {node}` removes it)")
        file_changes = self._apply_all(changed)
        self._up_dcs(file_changes, changed)
        db = self._up_database(file_changes, changed)
        # only now: every Patroni runs with its etcd login (a Patroni without one would lose its
        # leader key the moment etcd asks for logins)
        changed += etcd.ensure_auth(self.facts, self.secrets)
        self._up_balancers(file_changes, changed)
        self._up_poolers(file_changes, changed)
        self._up_broker(file_changes, changed)
        leader = self.facts.node(db.leader)
        changed += postgres.ensure_airflow_database(self.facts, self.secrets, leader.pg_primary)
        self._up_airflow(file_changes, changed)
        moved = etcd.move_leader_away(self.facts, leader.name)
        if moved:
            changed.append(f"moved etcd leadership from {leader.name} to {moved} (off the primary's node)")
        result: dict[str, Any] = {"changed": changed, "hosts": {
            n: {"files_changed": [str(p) for p in file_changes.get(n, [])],
                **self.actions.get(n, {"started": [], "restarted": [], "reloaded": []})}
            for n in self.facts.node_names}}
        if smoke or (smoke is None and changed):
            result["example_dag"] = self.run_example_dag()
        result["elapsed_s"] = round(time.monotonic() - t0, 1)
        return result

    def _preflight(self) -> None:
        def node_problems(n: Any) -> list[str]:
            return self.host.preflight(n.name, {(n.address, port): field for port, field in self.facts.listen_ports(n.name).items()})

        with ThreadPoolExecutor(max_workers=len(self.facts.nodes)) as pool:  # servers answer in parallel
            problems = [p for found in pool.map(node_problems, self.facts.nodes) for p in found]
        problems += [p for m in self.host.machines() for p in self.host.preflight(m, self.facts.host_listen_ports())]
        if problems:
            raise UserError(f"cannot start the cluster here: {len(problems)} problem(s)", details=problems)

    def _apply_all(self, changed: list[str]) -> dict[str, list[Path]]:
        desired = {node: self.desired(node) for node in self.facts.node_names}
        for node, state in desired.items():
            self.applied.expect(node, state)
        with ThreadPoolExecutor(max_workers=len(desired)) as pool:  # nodes' files are independent
            file_changes = dict(zip(desired, pool.map(lambda n: self.host.apply(n, desired[n]), desired)))
        changed += [str(p) for node in desired for p in file_changes[node]]
        for machine in self.host.machines():  # one epmd per machine, for every node on it
            changed += [str(p) for p in self.host.apply(machine, rabbitmq.render_machine(
                self.facts, self.host.machine_layout(machine), machine.nodes))]
            if self.host.boot(machine):
                changed.append(f"machine {machine.name}: started its supervisor")
        for node in self.facts.node_names:
            if self.host.boot(node):
                changed.append(f"{node}: started supervisor")
            self._stale[node] = set(self.host.stale(node))  # asked once per `up`
        return file_changes

    def _up_dcs(self, file_changes: dict[str, list[Path]], changed: list[str]) -> None:
        members = [n.name for n in self.facts.etcd_members]
        for name in [m for m in self.state.etcd_to_add() if m in members]:  # one at a time: etcd takes one learner
            changed += self._add_etcd_member(name)
        self.say("starting etcd")
        quorum = functools.partial(etcd.probe, self.facts)
        changed += self._ensure_service(etcd.NAME, members, file_changes,
                                        gate=("etcd quorum", quorum), last=etcd.leader_name(self.facts, timeout=1.0))
        if any(self.facts.etcd_join(m).state == "existing" for m in members):  # a run may have stopped before it
            for name in etcd.promote_learners(self.facts):
                changed.append(f"{name}: promoted from etcd learner to voting member")
        self._wait("etcd quorum (all members healthy, a leader)", ETCD_TIMEOUT_S, quorum)

    def _add_etcd_member(self, name: str) -> list[str]:
        """A member new to a running cluster: added through etcd's member API as a learner, its
        file rewritten with the member list etcd answered (recorded: a re-run finds it added),
        started, and promoted once in sync."""
        self.say(f"adding {name} to etcd (a learner until it catches up)")
        self.state.etcd_added(name, etcd.add_learner(self.facts, self.facts.node(name)))
        self.facts = self._read_facts()
        desired = self.desired(name)
        self.applied.expect(name, desired)
        self.host.apply(name, desired)
        self.host.start(name, etcd.NAME)
        self._act(name, "started", etcd.NAME)
        self.applied.took(name, etcd.NAME)
        etcd.promote_learners(self.facts)
        return [f"{name}: added to etcd as a learner, started, promoted to voting member"]

    def _up_database(self, file_changes: dict[str, list[Path]], changed: list[str]) -> patroni.DatabaseStatus:
        self.say("starting Patroni")
        changed += self._ensure_service(patroni.NAME, self.facts.names_with_role("database"), file_changes, reload=True,
                                        gate=("database", lambda: patroni.probe(self.facts)),
                                        last=patroni.probe(self.facts).leader)
        db = self._wait(
            f"database (a leader, {len(self.facts.database_nodes) - 1} streaming replicas"
            + (", a synchronous standby)" if self.spec.database.synchronous_mode else ")"),
            DATABASE_TIMEOUT_S,
            lambda: patroni.probe(self.facts),
        )
        patch = patroni.reconcile_dynamic_config(self.facts, self.secrets, self.facts.node(db.leader))
        if patch:
            changed.append(f"updated Patroni's cluster config: {', '.join(sorted(_flat_keys(patch)))}")
        rolled = self._roll_postgres_restarts(wait_s=self.spec.database.loop_wait + 5 if "postgresql" in patch else 0)
        changed += rolled
        return patroni.probe(self.facts) if rolled else db  # a roll moves the primary

    def _roll_postgres_restarts(self, wait_s: float) -> list[str]:
        """PostgreSQL parameters that need a restart: replicas one by one, then the primary's
        node after a switchover to its synchronous standby, each behind the database gate, so
        writes continue through the balancers. Patroni flags pending restarts at its next loop:
        after a parameter change, wait up to `wait_s` for the flags."""
        deadline = time.monotonic() + wait_s
        db = patroni.probe(self.facts)
        pending = set(patroni.pending_restart(db))
        while time.monotonic() < deadline:  # every member flags it in its own loop: collect them all
            time.sleep(1)
            db = patroni.probe(self.facts)
            pending |= set(patroni.pending_restart(db))
        done = []
        leader = db.leader
        for node in sorted(pending, key=lambda n: n == leader):
            if node == leader:
                moved = self.switchover()
                done.append(f"switched the primary from {moved['from']} to {moved['to']} to restart {node}")
                self._wait("database after the switchover", ROLLING_GATE_TIMEOUT_S, lambda: patroni.probe(self.facts))
                if node not in patroni.pending_restart(patroni.probe(self.facts)):  # the demotion restarted it already
                    done.append(f"{node}: restarted PostgreSQL for a changed parameter (as it was demoted)")
                    continue
            self.say(f"{node}: restarting PostgreSQL (a changed parameter needs it)")
            patroni.restart_postgres(self.facts, self.secrets, node)
            self._act(node, "restarted", "postgresql")
            self._wait(f"database after restarting PostgreSQL on {node}", ROLLING_GATE_TIMEOUT_S,
                       lambda: patroni.probe(self.facts))
            done.append(f"{node}: restarted PostgreSQL for a changed parameter")
        return done

    def _up_balancers(self, file_changes: dict[str, list[Path]], changed: list[str]) -> None:
        self.say("starting HAProxy")
        def routed() -> LayerStatus:
            return haproxy.probe(self.facts, self.secrets, patroni.probe(self.facts).leader)

        changed += self._ensure_service(haproxy.NAME, self.facts.node_names, file_changes, gate=("balancers", routed))
        self._wait("balancers (every node's primary port routes to the leader)", BALANCER_TIMEOUT_S, routed)

    def _up_poolers(self, file_changes: dict[str, list[Path]], changed: list[str]) -> None:
        self.say("starting PgBouncer")
        nodes = self.facts.node_names
        poolers = functools.partial(pgbouncer.probe, self.facts, self.secrets)
        # a pooler a killed switchover left paused holds every Airflow query: resume it first
        paused = [m.node for m in poolers().members if m.paused]
        if paused:
            pgbouncer.resume(self.facts, self.secrets, paused)
            changed.append(f"resumed the paused pooler on {', '.join(paused)}")
        changed += self._ensure_service(pgbouncer.NAME, nodes, file_changes, reload=True, gate=("poolers", poolers))
        self._wait("poolers (every node's PgBouncer answers, none paused)", BALANCER_TIMEOUT_S, poolers)

    def _up_broker(self, file_changes: dict[str, list[Path]], changed: list[str]) -> None:
        self.say("starting RabbitMQ (epmd first)")
        for machine in self._broker_machines():
            if self.host.start(machine, rabbitmq.EPMD):
                changed.append(f"machine {machine.name}: started epmd")
        broker = functools.partial(rabbitmq.probe, self.facts, self.secrets)
        changed += self._ensure_service(rabbitmq.NAME, self.facts.names_with_role("broker"), file_changes,
                                        gate=("broker", broker))
        self._wait(f"broker ({len(self.facts.broker_nodes)} RabbitMQ nodes running in one cluster, no alarms)",
                   BROKER_TIMEOUT_S, broker)
        changed += self._grow_quorum_queues()
        changed += self._ensure_service(rabbitmq.GUARD, self.facts.names_with_role("broker"), file_changes)

    def _grow_quorum_queues(self) -> list[str]:
        """A RabbitMQ node that joined holds no replica of the existing quorum queues: add one
        on it for each (what every node holds, a new node must hold to keep the replication)."""
        done = []
        for node, queues in rabbitmq.missing_replicas(self.facts, self.secrets).items():
            self.say(f"{node}: adding a replica of {len(queues)} quorum queue(s)")
            self._rabbit_cli(rabbitmq.grow(self.facts, node), node, "rabbitmq-queues grow")
            done.append(f"{node}: added a replica of quorum queue(s) {', '.join(queues)}")
        return done

    def _broker_machines(self) -> list[Machine]:
        return [m for m in self.host.machines() if any(rabbitmq.runs_on(self.facts.node(n)) for n in m.nodes)]

    def _up_airflow(self, file_changes: dict[str, list[Path]], changed: list[str]) -> None:
        nodes = self.facts.names_with_role("airflow")
        changed += self.dags.push()
        self._migrate_airflow_db(changed)
        self.say("starting Airflow api-servers")
        changed += self._ensure_service(airflow.API, nodes, file_changes, gate=("api-servers", self._api_servers_probe))
        self._wait("api-servers (every node's /api/v2/monitor/health answers)", AIRFLOW_TIMEOUT_S, self._api_servers_probe)
        changed += self._ensure_airflow_admin()
        # Every service starts where it is missing before any restart: the restart gate waits
        # for every node's services, a new node's included.
        self.say("starting schedulers, dag-processor candidates, triggerers, Celery workers")
        stale = {}
        for service, on in ((airflow.SCHEDULER, nodes), (airflow.DAG_PROCESSOR, nodes), (airflow.TRIGGERER, nodes),
                            (airflow.WORKER, self.facts.names_with_role("worker"))):
            started, stale[service] = self._start_missing(service, on, file_changes)
            changed += started
        healed: set[str] = set()
        gate = self._airflow_gate(healed)
        for service, where in stale.items():
            changed += self._restart_stale(service, where, reload=False, gate=("Airflow", gate))
        self._wait("Airflow (schedulers, triggerers, one dag-processor, every worker answering)", AIRFLOW_TIMEOUT_S, gate)
        changed += [f"{node}: restarted airflow-worker (it answered no ping for {DEAF_WORKER_S} s)" for node in sorted(healed)]

    def _api_servers_probe(self) -> LayerStatus:
        down = [n.name for n in self.facts.airflow_nodes if airflow.api_health(n) is None]
        return LayerStatus(not down, (f"api-server not answering on {', '.join(down)}",) if down else ())

    def _ensure_airflow_admin(self) -> list[str]:
        """FAB: the generated admin logs in, or is created (or its password reset) so it does."""
        if self.spec.airflow.auth_manager != "fab":
            return []
        node = self.facts.airflow_nodes[0]
        if airflow_api.login_works(f"http://{node.api_balancer}", self.secrets):
            return []
        layout = self.host.layout(node.name)
        argv, extra = airflow.admin_command(self.facts, layout, self.secrets)
        rc, out = self.host.run(node.name, argv, {**airflow.env(self.facts, node, layout, self.secrets), **extra},
                                timeout=300, user=layout.user("airflow"), cwd=airflow.home(layout))
        if rc != 0:
            tail = " | ".join(out.strip().splitlines()[-3:])
            raise ClusterUnhealthy(f"could not create the Airflow admin (exit {rc}): {tail}; data is kept, {self.host.recovery_hint()}")
        what = out.strip().splitlines()[-1] if out.strip() else "done"
        return [f"Airflow admin {self.secrets['airflow_admin'].username}: {what}"]

    def _migrate_airflow_db(self, changed: list[str]) -> None:
        """`airflow db migrate` once per Airflow version and set of providers (it is idempotent
        but slow to import)."""
        marker = self.state_dir / f"airflow-db-migrated-{self.spec.airflow.version}-{airflow.constraints_digest(self.spec.airflow.version)}"
        if marker.exists() and postgres.airflow_schema_present(self.facts, self.secrets):
            return
        self.say("migrating the Airflow database (airflow db migrate)")
        node = self.facts.airflow_nodes[0]
        layout = self.host.layout(node.name)
        venv = airflow.venv_dir(layout, self.spec.airflow.version)
        rc, out = self.host.run(node.name, [str(venv / "bin/airflow"), "db", "migrate"],
                                airflow.migrate_env(self.facts, node, layout, self.secrets), timeout=600,
                                user=layout.user("airflow"), cwd=airflow.home(layout))
        if rc != 0:
            tail = " | ".join(out.strip().splitlines()[-3:])
            raise ClusterUnhealthy(f"`airflow db migrate` failed (exit {rc}): {tail}; data is kept, {self.host.recovery_hint()}")
        marker.write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))
        changed.append(f"migrated the Airflow database to {self.spec.airflow.version}")

    # --- the Airflow layer ----------------------------------------------------------------------
    def airflow_probe(self) -> airflow.AirflowStatus:
        return airflow.probe(self.facts, self.secrets, self.dags.status(), postgres.live_primary_endpoint(self.facts))

    def _airflow_gate(self, healed: set[str]) -> Callable[[], airflow.AirflowStatus]:
        """The Airflow probe for `up`'s waits, which heals a deaf worker: one whose service runs
        but that has answered no ping for DEAF_WORKER_S is restarted, once per `up` (warm:
        running tasks finish first; what it had not started goes to the others). A worker can
        run tasks and still miss every control message, and nothing else brings it back. Only
        while other workers answer: when none does, the broker's path is what is wrong. The
        nodes whose worker it restarted go into `healed`."""
        silent_since: dict[tuple[str, str], float] = {}  # (node, worker instance): since when silent

        def probe() -> airflow.AirflowStatus:
            status = self.airflow_probe()
            if status.healthy or not status.workers:  # no answer at all: the broker's path, not a worker
                silent_since.clear()
                return status
            now = time.monotonic()
            for node in self.facts.names_with_role("worker"):
                if airflow.worker_name(self.facts, node) in status.workers or node in healed:
                    continue
                instance = self.host.instance(node, airflow.WORKER)
                if instance is None:  # not running: nothing to heal here (a gate reports it)
                    continue
                # counted per instance: a worker (re)started meanwhile gets its full time to answer
                if now - silent_since.setdefault((node, instance.id), now) >= DEAF_WORKER_S:
                    self.say(f"{node}: its Celery worker runs but has answered no ping for {DEAF_WORKER_S} s; "
                             "restarting it (running tasks finish first)")
                    self.host.restart(node, airflow.WORKER)
                    self._act(node, "restarted", airflow.WORKER)
                    healed.add(node)
            return status

        return probe

    def run_example_dag(self) -> dict[str, Any]:
        result = airflow_api.run_dag(airflow_api.connect(self.facts, self.secrets), EXAMPLE_DAG, EXAMPLE_TIMEOUT_S, self.say)
        if result["state"] != "success":
            raise ClusterUnhealthy(f"the example DAG run {result['run_id']} ended {result['state']}; see the task logs in the UI")
        return result

    def needs(self, machine: Machine) -> Needs:
        """What a machine must have: the sum of what each component its nodes run declares."""
        layout = self.host.layout(machine.nodes[0])
        total = Needs()
        for component in REGISTRY:
            if any(component.runs_on(self.facts.node(n)) for n in machine.nodes):
                total = total + component.needs(self.facts, layout)
        return total

    def missing_prerequisites(self) -> list[str]:
        return [f"{m.name}: {p}" for m in self.host.machines() for p in self.host.missing(m, self.needs(m))]

    def ensure_prerequisites(self) -> list[str]:
        """Distro packages, system users and runtime venvs on every machine; returns what was
        done (nothing on a re-run)."""
        self.say("checking prerequisites")
        machines = self.host.machines()
        with ThreadPoolExecutor(max_workers=len(machines)) as pool:  # servers install in parallel
            done = list(pool.map(lambda m: self.host.provision(m, self.needs(m), self.say), machines))
        return [c for d in done for c in d]

    def _ensure_service(
        self, service: str, nodes: list[str], file_changes: dict[str, list[Path]], reload: bool = False,
        gate: tuple[str, Callable[[], LayerStatus]] | None = None, last: str | None = None,
    ) -> list[str]:
        """Start the service where it is not running; where its config changed, reload it, or
        restart it one node at a time (the `last` node, e.g. the leader, at the end), waiting
        for the layer's `gate` after each restart, so a config change never takes a layer down."""
        done = self._reload_running(service, nodes, file_changes) if reload else []
        started, stale = self._start_missing(service, nodes, file_changes)
        return done + started + self._restart_stale(service, stale, reload, gate, last)

    def _start_missing(self, service: str, nodes: list[str], file_changes: dict[str, list[Path]]) -> tuple[list[str], list[str]]:
        """Start the service where it is not running; returns what was started and the nodes
        where it runs on an outdated configuration."""
        done, stale = [], []
        for node in nodes:
            if self.host.start(node, service):
                done.append(f"{node}: started {service}")
                self._act(node, "started", service)
                self.applied.took(node, service)
            elif self.applied.stale(node, service, file_changes.get(node, [])) or service in self._stale.get(node, ()):
                stale.append(node)
        return done, stale

    def _restart_stale(self, service: str, stale: list[str], reload: bool,
                       gate: tuple[str, Callable[[], LayerStatus]] | None, last: str | None = None) -> list[str]:
        done = []
        for node in sorted(stale, key=lambda n: n == last):
            if reload and service not in self._stale.get(node, ()):
                done.append(self._reload(node, service))
                continue
            self.say(f"{node}: restarting {service} (its configuration changed)")
            self.host.restart(node, service)
            self._act(node, "restarted", service)
            self.applied.took(node, service)
            done.append(f"{node}: restarted {service}")
            if gate:
                self._wait(f"{gate[0]} after restarting {service} on {node}", ROLLING_GATE_TIMEOUT_S, gate[1])
        return done

    def _reload_running(self, service: str, nodes: list[str], file_changes: dict[str, list[Path]]) -> list[str]:
        """Running members take their new files before a new member starts: it may need them
        (a new PostgreSQL replica's base backup needs the primary's pg_hba to admit it)."""
        done = []
        for node in nodes:
            if (self.host.instance(node, service) is not None and service not in self._stale.get(node, ())
                    and self.applied.stale(node, service, file_changes.get(node, []))):
                done.append(self._reload(node, service))
        return done

    def _reload(self, node: str, service: str) -> str:
        self.host.reload(node, service)
        self._act(node, "reloaded", service)
        self.applied.took(node, service)
        return f"{node}: reloaded {service}"

    def _act(self, node: str, action: str, service: str) -> None:
        record = self.actions.setdefault(node, {"started": [], "restarted": [], "reloaded": []})
        record[action].append(service)

    def _wait(self, what: str, timeout: float, probe: Callable[[], L]) -> L:
        self.say(f"waiting for {what}")
        deadline = time.monotonic() + timeout
        last: L | None = None
        while time.monotonic() < deadline:
            last = probe()
            if last.healthy:
                return last
            time.sleep(0.5)
        why = ("; ".join(last.problems) or _unhealthy_members(last)) if last else "not probed"
        raise ClusterUnhealthy(
            f"timed out after {timeout:.0f}s waiting for {what}: {why}; data is kept, {self.host.recovery_hint()}"
        )

    # --- down ---------------------------------------------------------------------------------
    def down(self) -> dict[str, Any]:
        """Orderly stop of every node; data kept. Raises ClusterUnhealthy if anything is left."""
        t0 = time.monotonic()
        nodes = self.facts.node_names
        removed = self.state.removed_nodes(self.spec)
        if removed:
            self.say(f"stopping nodes no longer in the spec: {', '.join(removed)}")
            self._parallel(self.host.stop_node, removed)
        self.say("stopping Celery workers (warm: running tasks finish), schedulers, triggerers, dag-processors")
        # No new work is queued while the workers finish theirs; the api-servers stay until the
        # workers are gone (a finishing task reports its state to an api-server).
        self._stop_all([(n, airflow.WORKER) for n in self.facts.names_with_role("worker")]
                       + [(n.name, s) for s in (airflow.SCHEDULER, airflow.TRIGGERER, airflow.DAG_PROCESSOR)
                          for n in self.facts.airflow_nodes])
        self.say("stopping api-servers")
        self._stop_all([(n.name, airflow.API) for n in self.facts.airflow_nodes])
        # RabbitMQ depends on none of the database layer: it stops beside it
        with ThreadPoolExecutor(max_workers=1) as pool:
            broker = pool.submit(self._stop_broker)
            self.say("stopping PgBouncer, then HAProxy")
            self._parallel(lambda n: self.host.stop(n, pgbouncer.NAME), nodes)
            self._parallel(lambda n: self.host.stop(n, haproxy.NAME), nodes)
            self._stop_database()
            self._stop_etcd()
            broker.result()

        self.say("stopping supervisors")
        self._parallel(self.host.stop_node, nodes)
        for machine in self.host.machines():  # epmd last: the RabbitMQ nodes deregister from it
            self.host.stop_node(machine)
        left = [p for t in [*removed, *nodes, *self.host.machines()] for p in self.host.leftovers(t)]
        if left:
            raise ClusterUnhealthy(f"processes still running after down: {', '.join(left)}")
        return {"elapsed_s": round(time.monotonic() - t0, 1)}

    def _stop_all(self, services: list[tuple[str, str]]) -> None:
        """Stop (node, service) pairs all at once."""
        with ThreadPoolExecutor(max_workers=max(1, len(services))) as pool:
            list(pool.map(lambda ns: self.host.stop(*ns), services))

    def _stop_broker(self) -> None:
        self.say("stopping RabbitMQ (each node's partition guard first)")
        self._parallel(lambda n: [self.host.stop(n, s) for s in (rabbitmq.GUARD, rabbitmq.NAME)],
                       self.facts.names_with_role("broker"))

    def _stop_database(self) -> None:
        """Patroni replicas (in parallel), then the leader. A synchronous standby that stops
        waits until the primary's next HA cycle releases it (up to 2 x loop_wait, 10-12 s
        measured): the leader is woken up (a no-op PATCH of /config) while the replicas stop."""
        self.say("stopping Patroni (replicas first, then the leader)")
        leader = patroni.probe(self.facts).leader
        replicas = [n for n in self.facts.names_with_role("database") if n != leader]
        with ThreadPoolExecutor(max_workers=max(1, len(replicas))) as pool:
            stopping = [pool.submit(self.host.stop, n, patroni.NAME) for n in replicas]
            while leader and not all(f.done() for f in stopping):
                patroni.wake_up(self.facts, self.secrets, leader)
                time.sleep(0.5)
            for f in stopping:
                f.result()
        if leader:
            self.host.stop(leader, patroni.NAME)

    def _stop_etcd(self) -> None:
        self.say("stopping etcd (followers first, then the leader)")
        etcd_leader = etcd.leader_name(self.facts, timeout=1.0)
        members = [n.name for n in self.facts.etcd_members]
        self._parallel(lambda n: self.host.stop(n, etcd.NAME), [n for n in members if n != etcd_leader])
        if etcd_leader:
            self.host.stop(etcd_leader, etcd.NAME)

    @staticmethod
    def _parallel(fn: Callable[[str], Any], nodes: list[str]) -> None:
        with ThreadPoolExecutor(max_workers=max(1, len(nodes))) as pool:
            list(pool.map(fn, nodes))

    def check_purgeable(self) -> None:
        """Purge deletes only a haflow state directory of this very cluster (UserError otherwise)."""
        self.state.check_purgeable(self.spec, self.source)

    def purge(self) -> None:
        self.check_purgeable()
        targets: list[Target] = [*self.host.machines(), *self.state.recorded_nodes(self.spec)]
        running = [t if isinstance(t, str) else f"machine {t.name}" for t in targets if self._alive(t)]
        if running:
            raise UserError(f"the cluster is still running ({', '.join(running)}); run `haflow down` first, "
                            "then `haflow down --purge --yes`")
        self.host.purge()

    # --- node changes ---------------------------------------------------------------------------
    def check_removable(self, name: str) -> None:
        """A node leaves the cluster only once it left the spec (the spec is the source of truth),
        and only a node the record knows (UserError otherwise). The spec without it was checked
        already: at least 3 full nodes, an odd etcd membership."""
        rec = self.state.record()
        if name in self.facts.node_names:
            raise UserError(f"{name} is still in {self.source}; delete it from `nodes:` first (the spec says what the "
                            f"cluster is), then run `haflow node remove {name}`")
        if rec is None or name not in rec.nodes:
            known = ", ".join(self.state.removed_nodes(self.spec)) or "none"
            raise UserError(f"{name} was never a node of cluster {self.spec.cluster}; nodes that left the spec: {known}")

    def remove_node(self, name: str, server_gone: bool = False) -> dict[str, Any]:
        """Drain and stop a node that left the spec (a full node hands over its quorum roles
        first), delete its files on its server, forget it, and re-apply the rest (PostgreSQL
        stops admitting its address), between health gates. Idempotent: a re-run after a failure
        picks up where it stopped.

        server_gone: its server is dead for good; the survivors drop it from every membership
        and nothing on the server is touched (refused while it still answers)."""
        t0 = time.monotonic()
        self.check_removable(name)
        rec = self.state.record()
        assert rec is not None  # check_removable
        if server_gone and self.host.running(name):  # unreachable is what --server-gone is for
            raise UserError(f"{name}'s server answers and runs haflow's services; run `haflow node remove {name}` "
                            "without --server-gone (it hands its roles over, stops it and deletes its files)")
        if set(rec.entries.get(name, {}).get("roles") or ROLES) != set(WORKER_ONLY):
            self._retire_full_node(name, touch_server=not server_gone)
        if not server_gone:
            self._stop_and_purge(name)
        self.applied.forget(name)
        self.state.forget(name)
        self.say("re-applying the cluster without it")
        result = self.up(smoke=False)
        return {"removed": name, "server_touched": not server_gone, "changed": result["changed"],
                "elapsed_s": round(time.monotonic() - t0, 1)}

    def _stop_and_purge(self, name: str) -> None:
        self.say(f"draining {name}'s Celery worker (running tasks finish)")
        self.host.stop(name, airflow.WORKER)
        self.say(f"stopping {name}")
        self.host.stop_node(name)
        left = self.host.leftovers(name)
        if left:
            raise ClusterUnhealthy(f"{name} still runs after its stop: {', '.join(left)}; nothing was deleted, re-run")
        self.say(f"deleting {name}'s configuration, data and logs")
        self.host.purge_node(name)

    def _facts_with(self, leaving: list[str]) -> ClusterFacts:
        """The cluster's facts with these nodes that left the spec still in it (their RabbitMQ
        names, etcd peer URLs, Patroni's view of them), as the record remembers them."""
        rec = self.state.record()
        assert rec is not None  # check_removable
        extra = [Node(name=n, address=rec.nodes[n], roles=rec.entries.get(n, {}).get("roles") or list(ROLES))
                 for n in leaving]
        members = [n.name for n in self.spec.etcd_members] + [n for n in leaving if n in rec.etcd]
        former = self.spec.model_copy(update={"nodes": [*self.spec.nodes, *extra],
                                              "etcd": self.spec.etcd.model_copy(update={"members": members})})
        return ClusterFacts(former, self.state.etcd_joins(former))

    def _retire_full_node(self, name: str, touch_server: bool = True) -> None:
        """Hand a full node's quorum roles to the others, each step safe to repeat: the primary
        moves off it, its Airflow services stop (the worker warm), every quorum queue drops its
        replica there and RabbitMQ forgets the node, its PostgreSQL (a replica by then) stops,
        and etcd removes its member. touch_server=False: its server is gone, so the survivors
        only drop it (Patroni failed over by itself; its services are dead)."""
        former = self._facts_with([name])
        stop = (lambda service: self.host.stop(name, service)) if touch_server else (lambda service: None)
        self._refuse_primary_on_another_leaving_node(name)
        if not touch_server:  # a dead primary's leader key expires and Patroni fails over by itself
            self._wait("database on the other nodes (a new primary if it held it)", ROLLING_GATE_TIMEOUT_S,
                       lambda: patroni.probe(self.facts))
        # a synchronous standby is named a little after a switchover: wait for a healthy layer
        db = self._wait("database", ROLLING_GATE_TIMEOUT_S, lambda: self._database_while_retiring(name, former))
        if db.leader == name:
            leader, candidate = patroni.switchover_plan(former, None)
            self.say(f"{name} holds the primary: switching it over to {candidate}")
            patroni.request_switchover(former, self.secrets, leader, candidate)
            self._wait(f"the primary on {candidate}", ROLLING_GATE_TIMEOUT_S,
                       lambda: _leader_on(patroni.probe(former), candidate))
        if touch_server:
            self.say(f"stopping {name}'s Airflow services (the worker warm: running tasks finish)")
            stop(airflow.WORKER)
            self._parallel(stop, [airflow.SCHEDULER, airflow.TRIGGERER, airflow.DAG_PROCESSOR, airflow.API])
        peer = self.facts.broker_nodes[0].name  # a RabbitMQ node that stays runs the CLI
        if former.rabbit_node_name(name) in rabbitmq.cluster_nodes(self.facts, self.secrets):  # not forgotten yet
            self.say(f"moving quorum queue replicas off {name}, then RabbitMQ forgets it")
            self._rabbit_cli(rabbitmq.shrink(former, name), peer, "rabbitmq-queues shrink")
            stop(rabbitmq.GUARD)
            stop(rabbitmq.NAME)
            self._rabbit_cli(rabbitmq.forget(former, name), peer, "rabbitmqctl forget_cluster_node")
        stop(rabbitmq.GUARD)
        stop(rabbitmq.NAME)
        stop(patroni.NAME)
        self._wait("database without it", ROLLING_GATE_TIMEOUT_S, lambda: patroni.probe(self.facts))
        if name in [n.name for n in former.etcd_members]:
            self.say(f"removing {name}'s etcd member")
            stop(etcd.NAME)
            etcd.remove_member(self.facts, former.node(name))
            self._wait("etcd quorum without it", ETCD_TIMEOUT_S, lambda: etcd.probe(self.facts))

    def _refuse_primary_on_another_leaving_node(self, name: str) -> None:
        """Several nodes left the spec: they leave one at a time, the primary's node first (the
        cluster without `name` must have its primary on a node that stays)."""
        others = [n for n in self.state.removed_nodes(self.spec) if n != name]
        leader = patroni.probe(self._facts_with([name, *others])).leader if others else None
        if leader in others:
            raise UserError(f"the primary is on {leader}, which left the spec too; run `haflow node remove {leader}` "
                            f"first (it hands the primary over), then remove {name}")

    def _database_while_retiring(self, name: str, former: ClusterFacts) -> patroni.DatabaseStatus:
        """The database with the node in it; once it is no longer the primary and not healthy
        there (an earlier run stopped its Patroni, or it lost its replication), without it."""
        db = patroni.probe(former)
        if not db.healthy and db.leader != name:
            return patroni.probe(self.facts)
        return db

    def _rabbit_cli(self, argv: list[str], peer: str, what: str) -> None:
        """A RabbitMQ CLI command aimed at `peer`'s node, run there as RabbitMQ's user (the CLI
        reads the Erlang cookie in its home)."""
        layout = self.host.layout(peer)
        rc, out = self.host.run(peer, argv, rabbitmq.env(self.facts, self.facts.node(peer), layout), timeout=120,
                                user=layout.user(rabbitmq.NAME))
        if rc != 0:
            raise ClusterUnhealthy(f"{peer}: {what} failed: {out.strip()[-300:]}; data is kept, re-run")

    # --- planned operations -------------------------------------------------------------------
    def switchover(self, to: str | None = None, timeout: float = 60) -> dict[str, Any]:
        """Planned primary change through Patroni; returns when every balancer routes to the new
        primary. Refuses (UserError) when unsafe: no healthy sync standby, lag, unknown node."""
        leader, candidate = patroni.switchover_plan(self.facts, to)
        self.say(f"switching the primary from {leader} to {candidate}")
        t0 = time.monotonic()
        # the demotion's own checkpoint then has little left to write
        postgres.checkpoint(self.facts, self.secrets)
        paused = pgbouncer.pause_all(self.facts, self.secrets, self.spec.pooler.pause_timeout_s)
        self._say_unpaused(paused)
        paused_s = time.monotonic() - t0
        resumed_s = None
        try:
            # Patroni answers the request only at its next one-second poll after the change:
            # the promotion is watched meanwhile, the balancers told and the poolers resumed at once.
            with ThreadPoolExecutor(max_workers=1) as pool:
                request = pool.submit(patroni.request_switchover, self.facts, self.secrets, leader, candidate)
                promoted_s = patroni.await_promotion(self.facts, candidate, leader, timeout, request)
                if promoted_s is not None:
                    haproxy.route_all_to(self.facts, self.secrets, candidate)
                    postgres.await_writable(self.facts.node(candidate).pg_primary, self.secrets)
                    pgbouncer.resume(self.facts, self.secrets, paused)
                    resumed_s = time.monotonic() - t0
                request.result()  # Patroni's refusal or failure, as before
        finally:
            if resumed_s is None and paused and pgbouncer.resume(self.facts, self.secrets, paused):
                self.say("a pooler did not take RESUME; `haflow up` resumes it")

        def routed() -> LayerStatus:
            lb = haproxy.probe(self.facts, self.secrets, candidate)
            leader = patroni.probe(self.facts).leader
            if leader == candidate:
                return lb
            return dataclasses.replace(lb, healthy=False, problems=(*lb.problems, f"the primary is {leader or 'none'}"))

        self._wait(f"every balancer to route to {candidate}", timeout, routed)
        routed_s = time.monotonic() - t0
        moved = etcd.move_leader_away(self.facts, candidate)
        return {"from": leader, "to": candidate, "elapsed_s": round(time.monotonic() - t0, 1),
                "poolers_paused": paused, "paused_s": round(paused_s, 2), "promoted_s": None if promoted_s is None else round(promoted_s, 2),
                "resumed_s": None if resumed_s is None else round(resumed_s, 2), "routed_s": round(routed_s, 2),
                "etcd_leader_moved_to": moved}

    def _say_unpaused(self, paused: list[str]) -> None:
        unpaused = sorted(set(self.facts.node_names) - set(paused))
        if unpaused:
            self.say(f"the poolers on {', '.join(unpaused)} did not pause (down, or a transaction stayed open "
                     f"{self.spec.pooler.pause_timeout_s} s): their clients may see the switchover")

    # --- last resort ----------------------------------------------------------------------------
    def kill_all(self) -> int:
        """Every process of the cluster dies at once, the machines' own services (epmd) included:
        a teardown's last resort after `down`. Returns how many processes died."""
        return sum(self.host.kill_node(t) for t in [*self.facts.node_names, *self.host.machines()])


def _flat_keys(d: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += _flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return out


def _leader_on(db: patroni.DatabaseStatus, node: str) -> LayerStatus:
    ok = db.leader == node
    return LayerStatus(ok, () if ok else (f"the primary is on {db.leader or 'no node'}, not yet on {node}",))


def _unhealthy_members(status: LayerStatus) -> str:
    bad = status.unhealthy_nodes()
    return f"not healthy: {', '.join(bad)}" if bad else "not healthy yet"
