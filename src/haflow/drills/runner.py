"""One drill: load on, fault, recovery, load off, then the measurements and the invariants.

    healthy? -> writer + canary DAG + observer on -> warm-up -> FAULT -> (victim back) ->
    healthy again -> cool-down -> load off -> every canary run finished -> verdict

Measurements: write RTO (first failed to first successful commit after the fault), the longest
write gap, the task-flow gap (longest time no canary task started or finished), the time until
the cluster was healthy again (stamped when the successful health check ended), task instances
that needed a retry and the time retries added. Invariants: the fault took effect, no
acknowledged write lost, every acknowledged canary trigger became a DAG run (and there were
some), no canary DAG run failed or left unfinished, every task instance executed, the cluster
healthy again; duplicate task executions are counted, not failed (Celery redelivery causes
them), as long as every run succeeds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from haflow import status
from haflow.cluster import Cluster
from haflow.components import airflow, airflow_api, patroni, postgres
from haflow.drills import canary, control
from haflow.drills.isolated_writer import IsolatedLog, IsolatedWriter
from haflow.drills.monitor import Monitor, Timeline
from haflow.drills.scenarios import SCENARIOS, BrokerWatch, Fault, Scenario, took_effect
from haflow.drills.writer import PooledWriter, Writer, lost_writes
from haflow.errors import ClusterUnhealthy, UserError

Say = Callable[[str], None]
PARTITION_NEW_PRIMARY_TIMEOUT_S = 120  # node-partition: the cut is healed after this even without a new primary
BROKER_MOVE_TIMEOUT_S = 150  # broker-partition: the cut is healed after this even if the queue leader did not move


@dataclass
class DrillOptions:
    node: str | None = None  # the victim; default: where the scenario hurts most
    hold_s: float = 20.0  # node-crash: how long the node stays down before it is brought back
    warmup_s: float = 8.0  # load before the fault
    cooldown_s: float = 5.0  # load after the cluster is healthy again
    healthy_timeout_s: float = 180.0  # the cluster must be healthy before a drill, within this
    recover_timeout_s: float = 300.0  # ... and again after the fault, within this


def wait_healthy(cluster: Cluster, timeout_s: float, after: float = 0.0) -> tuple[float | None, dict[str, Any]]:
    """Poll the status until healthy; returns (when the healthy check ended, last snapshot) or
    (None, last). A check counts only if it began after `after`."""
    deadline = time.monotonic() + timeout_s
    while True:
        started = time.time()
        snap = status.snapshot(cluster)
        if snap["healthy"] and started >= after:
            return time.time(), snap
        if time.monotonic() > deadline:
            return None, snap
        time.sleep(1.0)


def _wait_canary_dag(cluster: Cluster, timeout_s: float = 90) -> None:
    client = airflow_api.connect(cluster.facts, cluster.secrets)
    deadline = time.monotonic() + timeout_s
    while client.get(f"/dags/{canary.DAG_ID}").status_code == 404:
        if time.monotonic() > deadline:
            raise ClusterUnhealthy(f"the canary DAG {canary.DAG_ID} is not in the cluster; run `haflow dags push`")
        time.sleep(2)


def _wait_flowing(cluster: Cluster, writer: Writer, prefix: str, timeout_s: float = 120) -> None:
    """Until the writer has commits and a canary task has finished: the baseline exists."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if writer.log.acknowledged:
            with postgres.connect_any(cluster.facts, cluster.secrets) as conn:
                if canary.executions(conn, prefix):
                    return
        time.sleep(1)
    raise ClusterUnhealthy("no canary task finished within 120 s of load; check the workers (`haflow status`)")


def _victim_back(cluster: Cluster, fault: Fault, since: float, timeout_s: float) -> float | None:
    """When the init restarted the killed service (a new instance, not a killed one) and, for a
    scheduler, the new one heartbeats (status counts the dead one's last heartbeat as fresh for
    a while, so a process alone is not "back")."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = cluster.host.instance(fault.node, fault.service) if fault.service else None
        if now is not None and now not in fault.killed:
            if fault.service != airflow.SCHEDULER or _new_scheduler_job(cluster, fault.node, since):
                return time.time()
        time.sleep(0.2)
    return None


def _new_scheduler_job(cluster: Cluster, node: str, since: float) -> bool:
    try:
        with postgres.connect_any(cluster.facts, cluster.secrets) as conn:
            row = conn.execute("SELECT 1 FROM job WHERE job_type = 'SchedulerJob' AND state = 'running' AND hostname = %s"
                               " AND start_date > to_timestamp(%s)", (node, since)).fetchone()
        return row is not None
    except (psycopg.Error, ClusterUnhealthy):
        return False


def run_drill(cluster: Cluster, name: str, opts: DrillOptions | None = None, say: Say = lambda _: None) -> dict[str, Any]:
    if name not in SCENARIOS:
        raise UserError(f"unknown drill {name!r}; choose one of: {', '.join(SCENARIOS)}, all")
    scenario = SCENARIOS[name]
    opts = opts or DrillOptions()
    if opts.node is not None:
        cluster.facts.node(opts.node)  # unknown node -> UserError naming the known ones
    for n in [opts.node] if opts.node else [f.name for f in cluster.spec.full_nodes]:
        control.require(cluster.spec, n, scenario.needs, name)

    down = [n for n in cluster.facts.node_names if not cluster.host.running(n)]
    if down:
        raise ClusterUnhealthy(f"{', '.join(down)} {'is' if len(down) == 1 else 'are'} down, no drill on a broken cluster; run `haflow up` first")
    say(f"[{name}] waiting for a healthy cluster")
    healthy_at, snap = wait_healthy(cluster, opts.healthy_timeout_s)
    if healthy_at is None:
        raise ClusterUnhealthy(f"the cluster is not healthy, no drill on it: {'; '.join(status.problems(snap)) or 'see `haflow status`'}")
    _wait_canary_dag(cluster)

    prefix = f"drill-{name}-{time.strftime('%Y%m%dT%H%M%S')}-{os.urandom(2).hex()}"
    account = cluster.secrets["postgres_airflow"]
    endpoints = cluster.facts.pg_primary_endpoints
    writer = Writer(endpoints, account.username, account.password, cluster.facts.airflow_db, run_id=int(time.time()))
    writer.ensure_table()
    # the same writes through the poolers, as Airflow connects (a switchover pauses them)
    pooled = PooledWriter([n.pooler for n in cluster.facts.nodes], account.username, account.password,
                          cluster.facts.airflow_db, run_id=int(time.time()) + 2)
    with postgres.connect_any(cluster.facts, cluster.secrets) as conn:
        canary.ensure_table(conn)
    load = canary.CanaryLoad([f"http://{n.api_balancer}" for n in cluster.facts.nodes],
                             lambda url: airflow_api.ApiClient(url, cluster.secrets), prefix)
    timeline = Timeline()
    monitor = Monitor(cluster, timeline, broker=scenario.watch_broker)
    monitor.prime()
    say(f"[{name}] load on: a write every 50 ms, a canary DAG run every 1.5 s")
    writer.start()
    pooled.start()
    load.start()
    monitor.start()
    fault: Fault | None = None
    effect: tuple[bool, str] = (False, "no fault was struck")
    t0 = back_at = healthy_at = cut_at = None
    on_victim: IsolatedWriter | None = None
    broker_watch: BrokerWatch | None = None  # broker-partition: what the other side saw, from the cut on
    seen: dict[str, Any] = {}  # what bringing the victim back observed (node-partition: the majority's primary)
    isolated_log: IsolatedLog | None = None
    try:
        _wait_flowing(cluster, writer, prefix)
        time.sleep(opts.warmup_s)
        victim = opts.node or scenario.pick(cluster)
        if scenario.needs == control.NETWORK:
            on_victim = _start_isolated_writer(cluster, victim, opts, say, name)
        say(f"[{name}] fault on {victim}")
        t0 = time.time()
        fault = scenario.strike(cluster, victim)
        cut_at = time.time()  # a write begun after this cannot reach a server on the other side
        broker_watch = fault.broker_watch
        timeline.add(f"fault: {fault.what}", t0)
        if fault.isolated or fault.powered_off or fault.broker_isolated:
            what = "power-off" if fault.powered_off else "cut"
            timeline.add(f"{what} in effect (its nodes[].control command returned)", cut_at)
        effect = took_effect(cluster, fault)
        if not effect[0]:
            say(f"[{name}] the fault did not take effect: {effect[1]}")
        back_at = _bring_back(cluster, fault, t0, opts, timeline, say, name, seen)
        say(f"[{name}] waiting for the cluster to be healthy again")
        healthy_at, snap = wait_healthy(cluster, opts.recover_timeout_s, after=back_at or t0)
        if healthy_at is not None:
            timeline.add("cluster healthy again", healthy_at)
        time.sleep(opts.cooldown_s)
    finally:
        load_end = time.time()
        load.stop()
        wlog = writer.stop()
        plog = pooled.stop()
        monitor.stop()
        if fault is not None and (fault.isolated or fault.broker_isolated) and back_at is None:
            _heal_anyway(cluster, fault.node, say, name)  # the drill stopped early: never leave a cut behind
        if fault is not None and fault.held_down and back_at is None:
            say(f"[{name}] {fault.node} is still down: `haflow up` brings it back")
        if on_victim is not None:
            isolated_log = _stop_isolated_writer(on_victim, say, name)
        if broker_watch is not None:
            broker_watch.halt.set()
    say(f"[{name}] load off; waiting for every canary run to finish")
    af = cluster.spec.airflow
    drain_s = af.task_heartbeat_timeout_s + af.task_queued_timeout_s + 120
    connect = lambda: postgres.connect_any(cluster.facts, cluster.secrets)  # noqa: E731
    states = canary.wait_runs_finished(connect, prefix, drain_s)
    with connect() as conn:
        rows = canary.executions(conn, prefix)
        tis = canary.task_instances(conn, prefix)
        tries = canary.retries(conn, prefix)
        primary = postgres.live_primary_endpoint(cluster.facts)
        lost = [w for log in (wlog, plog)
                for w in lost_writes(log, primary, account.username, account.password, cluster.facts.airflow_db)]
    extra: dict[str, Any] = {}
    extra_violations: list[str] = []
    if on_victim is not None:
        extra, extra_violations = _partition_verdict(isolated_log, cut_at, timeline, seen)
    elif broker_watch is not None:
        extra, extra_violations = _broker_partition_verdict(broker_watch, cut_at, timeline)
    report = _report(name, scenario, fault, effect, t0, back_at, healthy_at, load_end, wlog, load.log, states, rows, tis,
                     tries, lost, timeline, status.problems(snap) if healthy_at is None else [])
    violations = report["violations"] + extra_violations
    return {**report, **_pooled_client(plog, t0 or load_end, load_end), **extra, "ok": not violations,
            "violations": violations}


def _pooled_client(plog: Any, t0: float, load_end: float) -> dict[str, Any]:
    """What the writer through the poolers saw from the fault on (reported, not judged: a
    pooler on a crashed node drops its clients too)."""
    gap, _ = canary.longest_gap(plog.ack_times, t0 - 0.1, load_end)
    return {"pooled_client_errors": len([t for t, _ in plog.errors if t >= t0]), "pooled_write_gap_s": round(gap, 2),
            "pooled_acknowledged_writes": len(plog.acknowledged)}


def _start_isolated_writer(cluster: Cluster, victim: str, opts: DrillOptions, say: Say, name: str) -> IsolatedWriter:
    """The writer on the victim's own server, writing into its PostgreSQL, acknowledged at least
    once before the cut (it proves it can)."""
    writer = IsolatedWriter(cluster, victim, run_id=int(time.time()) + 1)
    say(f"[{name}] starting a writer on {victim} itself, into its PostgreSQL")
    writer.start(duration_s=opts.recover_timeout_s + PARTITION_NEW_PRIMARY_TIMEOUT_S + opts.hold_s + 120)
    deadline = time.monotonic() + 30
    while not writer.read().acknowledged_before(time.time()):
        if time.monotonic() > deadline:
            writer.stop()
            raise ClusterUnhealthy(f"the writer on {victim} got no write acknowledged by its own PostgreSQL in 30 s; "
                                   "see `journalctl -u haflow-drill-*` on the server")
        time.sleep(1)
    return writer


def _stop_isolated_writer(writer: IsolatedWriter, say: Say, name: str) -> IsolatedLog | None:
    try:
        return writer.stop()
    except Exception as e:  # the server may still be cut off: say so, the verdict counts it as unknown
        say(f"[{name}] could not read the writer's log on {writer.node}: {e}")
        return None


def _partition_verdict(log: IsolatedLog | None, cut_at: float | None, timeline: Timeline,
                       seen: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """node-partition: the majority elected its own primary, and the isolated old primary
    acknowledged no write after the cut (it must refuse them once it cannot reach a majority),
    measured by the writer on its own server."""
    majority = {"majority_primary": seen.get("majority_primary"), "majority_primary_s": seen.get("majority_primary_s")}
    violations = [] if majority["majority_primary"] else [
        f"the majority elected no primary within {PARTITION_NEW_PRIMARY_TIMEOUT_S} s of the cut"]
    if log is None or cut_at is None:
        return ({**majority, "isolated_primary_writes_acknowledged": None, "isolated_primary_refuses_writes_s": None,
                 "split_brain": None, "isolated_writes_attempted": 0},
                violations + ["the writer on the isolated server left no log: its writes after the cut are unknown"])
    acked_after = len(log.acknowledged_after(cut_at))
    refused = log.first_refusal_after(cut_at)
    if refused is not None:
        timeline.add("the isolated old primary refuses writes (first error seen by the writer on it)", refused)
    else:
        violations.append("the isolated old primary never refused a write after the cut")
    if acked_after:
        violations.append(f"split brain: the isolated old primary acknowledged {acked_after} writes after the cut")
    return ({**majority, "isolated_primary_writes_acknowledged": acked_after,
             "isolated_primary_refuses_writes_s": round(refused - cut_at, 2) if refused is not None else None,
             "split_brain": acked_after > 0,
             "isolated_writes_attempted": len(log.attempts)}, violations)


def _heal_anyway(cluster: Cluster, node: str, say: Say, name: str) -> None:
    try:
        control.run(cluster.spec, node, "heal")
        say(f"[{name}] healed the cut of {node} (the drill stopped before it did)")
    except Exception as e:  # say it, and let the original error through
        say(f"[{name}] could not heal the cut of {node}: {e}; run its nodes[].control.heal by hand")


def _broker_partition_verdict(watch: BrokerWatch, cut_at: float | None, timeline: Timeline) -> tuple[dict[str, Any], list[str]]:
    """broker-partition: the cut-off RabbitMQ paused (pause_minority) and the task queue got a
    leader on the other side; times from the cut."""
    def since(t: float | None) -> float | None:
        return round(t - cut_at, 2) if t is not None and cut_at is not None else None

    violations = []
    if watch.cut_seen is not None:
        timeline.add(f"the other RabbitMQ nodes see {watch.victim}'s as down", watch.cut_seen)
    if watch.paused is not None:
        timeline.add(f"{watch.victim}'s RabbitMQ paused (pause_minority: its AMQP listener closed)", watch.paused)
    else:
        violations.append(f"{watch.victim}'s RabbitMQ never paused while cut off (pause_minority)")
    if watch.leader_moved is not None:
        timeline.add(f"the {airflow.QUEUE} queue's leader is {watch.leader_moved[1]} (the majority's side)", watch.leader_moved[0])
    else:
        violations.append(f"the {airflow.QUEUE} queue's leader did not move off {watch.victim} within "
                          f"{BROKER_MOVE_TIMEOUT_S} s of the cut")
    return ({"broker_cut_seen_s": since(watch.cut_seen), "broker_paused_s": since(watch.paused),
             "new_queue_leader": watch.leader_moved[1] if watch.leader_moved else None,
             "queue_leader_moved_s": since(watch.leader_moved[0] if watch.leader_moved else None)}, violations)


def _heal_after_broker_moves(cluster: Cluster, fault: Fault, opts: DrillOptions, timeline: Timeline, say: Say,
                             name: str, seen: dict[str, Any]) -> float:
    """Hold the broker cut until the cut-off node paused and the queue has a leader on the other
    side (or the wait runs out), then `hold_s` longer, then heal."""
    watch = fault.broker_watch
    assert watch is not None  # a broker fault carries its watch
    say(f"[{name}] {fault.node}'s RabbitMQ is cut off; waiting for it to pause and the queue leader to move")
    deadline = time.monotonic() + BROKER_MOVE_TIMEOUT_S
    while time.monotonic() < deadline and not (watch.paused and watch.leader_moved):
        time.sleep(0.5)
    return _hold_then_heal(cluster, fault, opts, timeline, say, name, f"{fault.node}'s RabbitMQ")


def _heal_after_new_primary(cluster: Cluster, fault: Fault, since: float, opts: DrillOptions, timeline: Timeline,
                            say: Say, name: str, seen: dict[str, Any]) -> float:
    """Hold the cut until the majority has its own primary (or the wait runs out), then
    `hold_s` longer, then heal."""
    say(f"[{name}] {fault.node} is cut off; waiting for the majority to elect a primary")
    deadline = time.monotonic() + PARTITION_NEW_PRIMARY_TIMEOUT_S
    while time.monotonic() < deadline:
        leader = patroni.probe(cluster.facts).leader
        if leader is not None and leader != fault.node:
            timeline.add(f"the majority's primary: {leader}")
            seen["majority_primary"], seen["majority_primary_s"] = leader, round(time.time() - since, 2)
            break
        time.sleep(0.5)
    return _hold_then_heal(cluster, fault, opts, timeline, say, name, fault.node)


def _hold_then_heal(cluster: Cluster, fault: Fault, opts: DrillOptions, timeline: Timeline, say: Say, name: str,
                    what: str) -> float:
    """The cut held `hold_s` longer, then healed (nodes[].control.heal); returns when."""
    say(f"[{name}] holding the cut {opts.hold_s:.0f} s more")
    time.sleep(opts.hold_s)
    control.run(cluster.spec, fault.node, "heal")
    back = time.time()
    timeline.add(f"{what} reconnected (nodes[].control.heal)", back)
    return back


def _bring_back(cluster: Cluster, fault: Fault, since: float, opts: DrillOptions, timeline: Timeline, say: Say,
                name: str, seen: dict[str, Any]) -> float | None:
    if fault.isolated:
        return _heal_after_new_primary(cluster, fault, since, opts, timeline, say, name, seen)
    if fault.broker_isolated:
        return _heal_after_broker_moves(cluster, fault, opts, timeline, say, name, seen)
    if fault.powered_off:
        say(f"[{name}] {fault.node} stays off for {opts.hold_s:.0f} s")
        time.sleep(opts.hold_s)
        control.run(cluster.spec, fault.node, "power_on")
        timeline.add(f"{fault.node} powered on (nodes[].control.power_on)")
        say(f"[{name}] {fault.node} is booting; its services start by themselves")
        deadline = time.monotonic() + opts.recover_timeout_s
        while time.monotonic() < deadline:
            if cluster.host.running(fault.node):
                back = time.time()
                timeline.add(f"{fault.node} booted: its services run again (started by its own init)", back)
                return back
            time.sleep(1)
        return None
    if fault.held_down:
        say(f"[{name}] {fault.node} stays down for {opts.hold_s:.0f} s")
        time.sleep(opts.hold_s)
        timeline.add(f"bringing {fault.node} back (`haflow up`)")
        cluster.up(smoke=False)
        back = time.time()
        timeline.add(f"{fault.node} back: `haflow up` returned", back)
        return back
    if fault.service:
        back = _victim_back(cluster, fault, since, opts.recover_timeout_s)
        if back is not None:
            timeline.add(f"{fault.service} on {fault.node} restarted by its supervisor", back)
        return back
    return time.time()


def _report(name: str, scenario: Scenario, fault: Fault | None, effect: tuple[bool, str], t0: float | None,
            back_at: float | None, healthy_at: float | None, load_end: float, wlog: Any, tlog: canary.TriggerLog,
            states: dict[str, str], rows: list[dict[str, Any]], tis: list[Any], tries: dict[str, Any], lost: list[int],
            timeline: Timeline, unhealthy_why: list[str]) -> dict[str, Any]:
    t0 = t0 or load_end
    errors = [t for t, _ in wlog.errors if t >= t0]
    rto = None
    if errors:
        resumed = wlog.first_ack_after(errors[-1])
        rto = round(resumed - errors[0], 2) if resumed else None
        timeline.add("first failed write", errors[0])
        if resumed:
            timeline.add("writes resumed (first commit after the last failed one)", resumed)
    write_gap, _ = canary.longest_gap(wlog.ack_times, t0 - 0.1, load_end)
    task_events = [e for r in rows for e in (r["started"], r["finished"])]
    flow_gap, gap_at = canary.longest_gap(task_events, t0, load_end)
    if flow_gap > 0:
        timeline.add(f"task flow resumed after a {flow_gap:.1f} s gap", gap_at + flow_gap)
    v = canary.verdict(states, rows, tis)
    acknowledged = [run_id for _, run_id in tlog.triggered]
    missing_runs = [r for r in acknowledged if r not in states]
    violations = []
    if not effect[0]:
        violations.append(f"the fault did not take effect: {effect[1]}")
    if not acknowledged:
        violations.append("no canary DAG run was acknowledged: the drill measured no task flow")
    if missing_runs:
        violations.append(f"{len(missing_runs)} acknowledged canary triggers have no DAG run (first: {missing_runs[0]})")
    if lost:
        violations.append(f"{len(lost)} acknowledged writes lost")
    if v["dag_runs_failed"]:
        violations.append(f"{v['dag_runs_failed']} canary DAG runs failed")
    if v["dag_runs_unfinished"]:
        violations.append(f"{v['dag_runs_unfinished']} canary DAG runs did not finish")
    if v["tasks_never_executed"]:
        violations.append(f"{v['tasks_never_executed']} task instances never executed")
    if healthy_at is None:
        violations.append("the cluster did not become healthy again: " + ("; ".join(unhealthy_why) or "see `haflow status`"))
    if errors and rto is None:
        violations.append("writes did not resume")
    return {
        "scenario": name,
        "summary": scenario.summary,
        "ok": not violations,
        "violations": violations,
        "node": fault.node if fault else None,
        "rto_s": 0.0 if not errors else rto,
        "write_gap_s": round(write_gap, 2),
        "client_errors": len(errors),
        "task_flow_gap_s": round(flow_gap, 2),
        "victim_back_s": round(back_at - t0, 2) if back_at else None,
        "recovered_s": round(healthy_at - t0, 2) if healthy_at else None,
        "acknowledged_writes": len(wlog.acknowledged),
        "acknowledged_writes_lost": len(lost),
        "writes_in_doubt": len(wlog.in_doubt),
        "dag_runs_triggered": len(tlog.triggered),
        "fault_took_effect": effect[0],
        "canary_triggers_acknowledged": len(acknowledged),
        "canary_runs_found": len(acknowledged) - len(missing_runs),
        "task_instances_retried": tries["retried"],
        "retry_delay_s": tries["delay_s"],
        **v,
        "timeline": [{"t_s": round(t - t0, 2), "event": what} for t, what in sorted(timeline.events)],
    }
