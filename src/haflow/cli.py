"""The command line: parse, call, print. No logic lives here (design.md §4 is the contract).

Exit codes: 0 success, 1 cluster unhealthy, 2 bad input (one line per problem, never a traceback).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from haflow import hosts, lb, lock
from haflow import status as status_mod
from haflow.cluster import EXAMPLE_TIMEOUT_S, Cluster
from haflow.components import airflow_api

from haflow.drills.runner import DrillOptions, run_drill
from haflow.drills.scenarios import ALL as SCENARIO_NAMES
from haflow.drills.scenarios import runnable as runnable_scenarios
from haflow.errors import HaflowError, UserError
from haflow.facts import ClusterFacts
from haflow.lab import Lab
from haflow.lab import image as lab_image
from haflow.secrets import BREAKS
from haflow.secrets import FILE_NAME as SECRETS_FILE
from haflow.fsutil import atomic_write
from haflow.spec import Spec, check_paths, default_spec_text, load_spec
from haflow.statedir import StateDir

out = Console(soft_wrap=True)
err = Console(stderr=True)
STATE_ENV = "HAFLOW_STATE_DIR"
DEBUG_ENV = "HAFLOW_DEBUG"


def resolve_state_dir(spec_path: Path | None, state_dir: Path | None) -> Path:
    """--state-dir, else $HAFLOW_STATE_DIR, else .haflow next to the spec (or in the cwd)."""
    if state_dir is None and os.environ.get(STATE_ENV):
        state_dir = Path(os.environ[STATE_ENV])
    if state_dir is None:
        state_dir = (spec_path.parent if spec_path else Path.cwd()) / ".haflow"
    return state_dir.absolute()


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except HaflowError as e:
            err.print(f"[bold red]error:[/] {escape(e.message)}", highlight=False, soft_wrap=True)
            for line in e.details:
                err.print(f"  {escape(line)}", highlight=False, soft_wrap=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            err.print("interrupted; nothing is lost: re-run the command to continue")
            sys.exit(130)
        except Exception as e:  # a bug: one line, and the traceback only on request
            if os.environ.get(DEBUG_ENV):
                raise
            err.print(f"[bold red]internal error:[/] {type(e).__name__}: {e} (set {DEBUG_ENV}=1 for the traceback)", highlight=False, soft_wrap=True)
            sys.exit(1)

    return wrapper


def spec_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("-f", "--file", "spec_file", type=click.Path(path_type=Path), help="Cluster spec (default: the embedded 3-node local cluster).")(fn)
    fn = click.option("--state-dir", type=click.Path(path_type=Path), help=f"Where data, logs and secrets live (default: .haflow next to the spec; env {STATE_ENV}).")(fn)
    return fn


def load_checked(spec_file: Path | None, state_dir: Path | None) -> tuple[Spec, Path | None, Path, str]:
    """The spec, its folder, the state directory and how errors name the spec; the paths the
    spec names are checked (exit 2) before anything else happens."""
    spec = load_spec(spec_file)
    spec_dir = spec_file.parent.absolute() if spec_file else None
    state = resolve_state_dir(spec_file, state_dir)
    check_paths(spec, spec_dir, state)
    return spec, spec_dir, state, str(spec_file) if spec_file else "the embedded default spec"


def make_cluster(spec_file: Path | None, state_dir: Path | None, say: Callable[[str], None] | None = None,
                 regenerate_secrets: bool = False) -> Cluster:
    spec, spec_dir, state, source = load_checked(spec_file, state_dir)
    return Cluster(spec, state, say or (lambda _: None), spec_dir=spec_dir, source=source,
                   regenerate_secrets=regenerate_secrets, host=hosts.for_spec(spec, state, spec_dir))


def locked(cluster: Cluster, command: str) -> contextlib.AbstractContextManager[None]:
    """One mutating command per cluster at a time (`up` may create the state directory)."""
    owned = cluster.state.record() is not None or cluster.state.has_legacy_data() or (cluster.state_dir / lock.LOCK_FILE).exists()
    if command != "up" and not owned:
        return contextlib.nullcontext()  # nothing of a cluster there: write no lock file either
    return lock.exclusive(cluster.state_dir, command)


class Progress:
    """Prints each step of a long operation with the time since it began."""

    def __init__(self, enabled: bool = True) -> None:
        self.t0 = time.monotonic()
        self.enabled = enabled

    def __call__(self, msg: str) -> None:
        if self.enabled:
            err.print(f"[dim]{time.monotonic() - self.t0:6.1f}s[/] {escape(msg)}", highlight=False)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="haflow")
def cli() -> None:
    """haflow: a highly available Apache Airflow cluster on ordinary Linux machines."""


@cli.command()
@click.argument("path", type=click.Path(path_type=Path), default=Path("haflow.yaml"))
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@handle_errors
def init(path: Path, force: bool) -> None:
    """Write the default spec (commented) to PATH (default: haflow.yaml)."""
    if path.exists() and not force:
        raise UserError(f"{path} already exists; pass --force to overwrite it or choose another path")
    atomic_write(path, default_spec_text(), 0o644)
    out.print(f"wrote {path}; edit it, then run `haflow up -f {path}`")


@cli.command()
@spec_options
@click.option("--json", "as_json", is_flag=True, help='Print {"valid": true|false, "cluster", "problems": [...]}.')
@handle_errors
def validate(spec_file: Path | None, state_dir: Path | None, as_json: bool) -> None:
    """Check a spec offline and change nothing: exit 0 if valid, 2 with one line per problem."""
    try:
        spec, _, state, source = load_checked(spec_file, state_dir)
        StateDir(state).check_owner(spec, source)  # the directory, if any, holds this cluster
    except UserError as e:
        if not as_json:
            raise
        out.print_json(json.dumps({"valid": False, "cluster": None, "problems": [e.message, *e.details]}))
        sys.exit(2)
    if as_json:
        out.print_json(json.dumps({"valid": True, "cluster": spec.cluster, "problems": []}))
    else:
        out.print(f"{source}: valid (cluster {spec.cluster})")


@cli.command()
@spec_options
@click.option("--json", "as_json", is_flag=True, help="Print the result and final status as JSON.")
@click.option("--smoke/--no-smoke", default=None, help="Run the example DAG at the end (default: when something changed).")
@click.option("--regenerate-secrets", is_flag=True,
              help="Replace secrets that are missing from the secrets file with new ones. Breaks: " + "; ".join(BREAKS.values()) + ".")
@handle_errors
def up(spec_file: Path | None, state_dir: Path | None, as_json: bool, smoke: bool | None, regenerate_secrets: bool) -> None:
    """Start the cluster (or restart what is missing), wait for health, run the example DAG, show status."""
    cluster = make_cluster(spec_file, state_dir, Progress(), regenerate_secrets=regenerate_secrets)
    if cluster.host.kind != "local":
        raise UserError(f"{spec_file}: its nodes are servers reached over SSH; put the cluster on them with "
                        f"`haflow deploy -f {spec_file}`")
    with locked(cluster, "up"):
        result = cluster.up(smoke=smoke)
    snap = status_mod.snapshot(cluster)
    if as_json:
        out.print_json(json.dumps({"up": result, "status": snap}))
    else:
        what = f"{len(result['changed'])} change(s)" if result["changed"] else "nothing changed (already up)"
        out.print(f"cluster [bold]{cluster.facts.name}[/] is up in {result['elapsed_s']}s: {what}")
        if ex := result.get("example_dag"):
            out.print(f"example DAG {ex['dag_id']}: {ex['state']} in {ex['duration_s']}s, {ex['tasks']} tasks on {', '.join(ex['nodes'])}")
        out.print(f"Airflow UI: {cluster.facts.api_urls[0]} (user {cluster.secrets['airflow_admin'].username}; "
                  f"password: `haflow secrets show`, stored in {cluster.state_dir / SECRETS_FILE})")
        print_status(snap)
    sys.exit(0 if snap["healthy"] else 1)


@cli.command()
@click.option("-f", "--file", "spec_file", type=click.Path(path_type=Path), required=True,
              help="Cluster spec whose nodes carry `ssh` (the servers to deploy to).")
@click.option("--state-dir", type=click.Path(path_type=Path), help=f"Where secrets and records live (default: .haflow next to the spec; env {STATE_ENV}).")
@click.option("--dry-run", is_flag=True, help="Print per server the diff of every file that would change (secrets masked) and the services that would (re)start; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Per server: files changed and services started/restarted (docs/deploy.md).")
@click.option("--smoke/--no-smoke", default=None, help="Run the example DAG at the end (default: when something changed).")
@handle_errors
def deploy(spec_file: Path, state_dir: Path | None, dry_run: bool, as_json: bool, smoke: bool | None) -> None:
    """Put the cluster on its servers over SSH as systemd services (idempotent; rolling changes)."""
    cluster = make_cluster(spec_file, state_dir, Progress())
    try:
        if cluster.host.kind != "ssh":
            raise UserError(f"{spec_file}: its nodes have no `ssh`, so there are no servers to deploy to; give every node "
                            "`ssh: {user, key}` (docs/deploy.md), or run the cluster on this machine with `haflow up`")
        if dry_run:
            plan = cluster.plan()
            if as_json:
                out.print_json(json.dumps({"dry_run": True, "hosts": plan}))
            else:
                print_plan(plan)
            return
        with locked(cluster, "up"):
            result = cluster.up(smoke=smoke)
        snap = status_mod.snapshot(cluster)
    finally:
        close = getattr(cluster.host, "close", None)
        if close:
            close()
    if as_json:
        out.print_json(json.dumps({"deploy": result, "status": snap}))
    else:
        what = f"{len(result['changed'])} change(s)" if result["changed"] else "nothing changed (already deployed)"
        out.print(f"cluster [bold]{cluster.facts.name}[/] is deployed in {result['elapsed_s']}s: {what}")
        for node, acts in result["hosts"].items():
            if any(acts.values()):
                out.print(f"  {node}: {len(acts['files_changed'])} file(s) changed; started {', '.join(acts['started']) or '-'}; "
                          f"restarted {', '.join(acts['restarted']) or '-'}")
        if ex := result.get("example_dag"):
            out.print(f"example DAG {ex['dag_id']}: {ex['state']} in {ex['duration_s']}s, {ex['tasks']} tasks on {', '.join(ex['nodes'])}")
        print_status(snap)
    sys.exit(0 if snap["healthy"] else 1)


def print_plan(plan: dict[str, Any]) -> None:
    for node, p in plan.items():
        if not p["files"] and not p["start"] and not p["restart"]:
            out.print(f"[bold]{node}[/]: nothing would change")
            continue
        out.print(f"[bold]{node}[/]: {len(p['files'])} change(s); would start {', '.join(p['start']) or '-'}; "
                  f"would restart {', '.join(p['restart']) or '-'}")
        for f in p["files"]:
            out.print(f"  {f['what']}: {f['path']}", highlight=False)
            if f["diff"]:
                out.print(escape(f["diff"].rstrip("\n")), highlight=False)


@cli.command()
@spec_options
@click.option("--purge", is_flag=True, help="Also delete all data, logs and secrets of the cluster.")
@click.option("--yes", is_flag=True, help="Confirm --purge.")
@handle_errors
def down(spec_file: Path | None, state_dir: Path | None, purge: bool, yes: bool) -> None:
    """Stop the cluster in order; data is kept unless --purge --yes."""
    cluster = make_cluster(spec_file, state_dir, Progress())
    if purge and not yes:
        raise UserError(f"--purge deletes every database, log and secret in {cluster.state_dir}; add --yes to confirm")
    if purge:
        cluster.check_purgeable()  # before anything is stopped or written there
    with locked(cluster, "down"):
        result = cluster.down()
        if purge:
            cluster.purge()
    if purge:
        out.print(f"cluster [bold]{cluster.facts.name}[/] stopped and purged ({cluster.state_dir} deleted)")
    else:
        out.print(f"cluster [bold]{cluster.facts.name}[/] stopped in {result['elapsed_s']}s, nothing left running; "
                  f"data kept in {cluster.state_dir}")


@cli.command()
@spec_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (stable keys, see docs/status.md).")
@handle_errors
def status(spec_file: Path | None, state_dir: Path | None, as_json: bool) -> None:
    """Health of every layer; exit 1 if anything is degraded."""
    cluster = make_cluster(spec_file, state_dir)
    snap = status_mod.snapshot(cluster)
    if as_json:
        out.print_json(json.dumps(snap))
    else:
        print_status(snap)
    sys.exit(0 if snap["healthy"] else 1)


@cli.command()
@spec_options
@click.option("--install", is_flag=True, help="Install what is missing (apt as root) and build the runtime venvs.")
@handle_errors
def prereqs(spec_file: Path | None, state_dir: Path | None, install: bool) -> None:
    """Check (or install) the system packages and runtime venvs the cluster needs."""
    cluster = make_cluster(spec_file, state_dir, Progress())
    if install:
        done = cluster.ensure_prerequisites()
        out.print("prerequisites ready" + (f": {', '.join(done)}" if done else " (nothing to do)"))
        return
    need = cluster.missing_prerequisites()
    if need:
        raise UserError(f"missing {', '.join(need)}; run `haflow prereqs --install` as root")
    out.print("system prerequisites present")


@cli.command()
@spec_options
@click.option("--to", "to", help="The node to make primary (default: the synchronous standby).")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def switchover(spec_file: Path | None, state_dir: Path | None, to: str | None, as_json: bool) -> None:
    """Planned primary change through Patroni; waits until every balancer routes to the new primary."""
    cluster = make_cluster(spec_file, state_dir, Progress(not as_json))
    with locked(cluster, "switchover"):
        result = cluster.switchover(to)
    if as_json:
        out.print_json(json.dumps(result))
    else:
        out.print(f"primary moved from {result['from']} to {result['to']} in {result['elapsed_s']}s; every balancer routes to it")


@cli.command()
@spec_options
@click.argument("scenario", type=click.Choice([*SCENARIO_NAMES, "all"]), metavar="SCENARIO")
@click.option("--node", help="The victim node (default: where the scenario hurts most, e.g. the primary's node).")
@click.option("--repeat", type=click.IntRange(1, 100), default=1, show_default=True, help="Run the scenario(s) this many times.")
@click.option("--hold", "hold_s", type=click.FloatRange(0, 3600), default=20.0, show_default=True,
              help="node-crash: seconds the node stays down; node-partition: seconds the cut is held after the majority has a new primary.")
@click.option("--json", "as_json", is_flag=True, help="Print every drill's measurements, invariants and timeline as JSON.")
@handle_errors
def drill(spec_file: Path | None, state_dir: Path | None, scenario: str, node: str | None, repeat: int, hold_s: float,
          as_json: bool) -> None:
    """Kill part of the running cluster under load and measure recovery; exit 1 if an invariant broke.

    SCENARIO: db-primary-crash, node-crash (a server with nodes[].control power commands is
    powered off hard), node-partition (servers with nodes[].control isolate/heal only),
    broker-node-crash, scheduler-crash, api-server-crash, worker-crash, etcd-leader-crash,
    switchover, or all (each in turn that the spec can run)."""
    progress = Progress()  # one clock for the drill's steps and the `up` that brings a node back
    cluster = make_cluster(spec_file, state_dir, progress)
    names = runnable_scenarios(cluster.spec) if scenario == "all" else [scenario]
    if node is not None:
        cluster.facts.node(node)  # bad input first: exit 2 naming the known nodes
    results = []
    with locked(cluster, "drill"):
        for _ in range(repeat):
            for name in names:
                r = run_drill(cluster, name, DrillOptions(node=node, hold_s=hold_s), say=progress)
                results.append(r)
                if not as_json:
                    print_drill(r)
    if as_json:
        out.print_json(json.dumps(results if len(results) > 1 or scenario == "all" else results[0]))
    elif len(results) > 1:
        print_drill_summary(results)
    if not all(r["ok"] for r in results):
        sys.exit(1)


def print_drill(r: dict[str, Any]) -> None:
    verdict = "[bold green]passed[/]" if r["ok"] else "[bold red]FAILED[/]: " + escape("; ".join(r["violations"]))
    out.print(f"\n[bold]drill {r['scenario']}[/] on {r['node']}: {verdict}")
    t = Table(show_header=True, header_style="bold")
    for col in ("write RTO", "write gap", "client errors", "task gap", "healthy", "writes (lost)", "runs (failed)", "never run", "dupl."):
        t.add_column(col, justify="right")
    t.add_row(_s(r["rto_s"]), _s(r["write_gap_s"]), str(r["client_errors"]), _s(r["task_flow_gap_s"]), _s(r["recovered_s"]),
              f"{r['acknowledged_writes']} ({r['acknowledged_writes_lost']})", f"{r['dag_runs']} ({r['dag_runs_failed']})",
              str(r["tasks_never_executed"]), str(r["duplicate_executions"]))
    out.print(t)
    tl = Table("t", "event", show_header=True, header_style="bold", box=None)
    for e in r["timeline"]:
        tl.add_row(f"{e['t_s']:+.2f}s", escape(e["event"]))
    out.print(tl)


def print_drill_summary(results: list[dict[str, Any]]) -> None:
    t = Table("drill", "node", "ok", "write RTO", "task-flow gap", "healthy after", "lost writes", "failed runs",
              "never run", "duplicates", title="drills", header_style="bold")
    for r in results:
        t.add_row(r["scenario"], r["node"] or "-", "yes" if r["ok"] else "[red]NO[/]", _s(r["rto_s"]), _s(r["task_flow_gap_s"]),
                  _s(r["recovered_s"]), str(r["acknowledged_writes_lost"]), str(r["dag_runs_failed"]),
                  str(r["tasks_never_executed"]), str(r["duplicate_executions"]))
    out.print(t)


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} s"


@cli.group()
def dags() -> None:
    """The DAG folder every node runs."""


@dags.command("push")
@spec_options
@handle_errors
def dags_push(spec_file: Path | None, state_dir: Path | None) -> None:
    """Copy the spec's DAG folder to every node (atomically) and check the checksums agree."""
    cluster = make_cluster(spec_file, state_dir, Progress())
    with locked(cluster, "dags push"):
        done = cluster.dags.push()
    st = cluster.dags.status()
    out.print(f"DAGs {st['source_checksum'][:12]} from {st['source']}: " + (", ".join(done) if done else "every node already current"))
    if not st["agree"]:
        raise HaflowError("node DAG folders still differ after the push; check disk space and permissions")


@dags.command("trigger")
@spec_options
@click.argument("dag_id")
@click.option("--wait/--no-wait", default=True, help="Wait for the run to finish (exit 1 unless it succeeded).")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def dags_trigger(spec_file: Path | None, state_dir: Path | None, dag_id: str, wait: bool, as_json: bool) -> None:
    """Trigger a DAG run through the API (and wait for it)."""
    cluster = make_cluster(spec_file, state_dir, Progress(not as_json))
    if not wait:
        run_id = airflow_api.connect(cluster.facts, cluster.secrets).trigger(dag_id)
        out.print_json(json.dumps({"dag_id": dag_id, "run_id": run_id})) if as_json else out.print(f"triggered {dag_id}: {run_id}")
        return
    result = airflow_api.run_dag(airflow_api.connect(cluster.facts, cluster.secrets), dag_id, EXAMPLE_TIMEOUT_S,
                                 Progress(not as_json))
    if as_json:
        out.print_json(json.dumps(result))
    else:
        out.print(f"{dag_id} {result['run_id']}: {result['state']} in {result['duration_s']}s, {result['tasks']} tasks on {', '.join(result['nodes'])}")
    sys.exit(0 if result["state"] == "success" else 1)


@cli.group()
def secrets() -> None:
    """The cluster's generated accounts and passwords."""


@secrets.command("show")
@spec_options
@click.option("--json", "as_json", is_flag=True, help="Each account as an object with username and password.")
@click.option("--keys", is_flag=True, help="Also the shared keys (fernet key, JWT secret, API secret key, Erlang cookie).")
@handle_errors
def secrets_show(spec_file: Path | None, state_dir: Path | None, as_json: bool, keys: bool) -> None:
    """Print the cluster's accounts with their passwords (asked for explicitly)."""
    cluster = make_cluster(spec_file, state_dir)
    accounts = cluster.secrets.as_dict()
    if as_json:
        out.print_json(json.dumps({**accounts, "keys": cluster.secrets.keys_dict()} if keys else accounts))
        return
    t = Table(title=f"secrets of {cluster.facts.name} ({cluster.state_dir / SECRETS_FILE})")
    for col in ("account", "username", "password"):
        t.add_column(col)
    for key, acc in accounts.items():
        t.add_row(key, acc["username"], acc["password"])
    if keys:
        for name, value in cluster.secrets.keys_dict().items():
            t.add_row(name, "-", value)
    out.print(t)


def _mark(ok: bool) -> str:
    return "[green]ok[/]" if ok else "[red]DEGRADED[/]"


def print_status(snap: dict[str, Any]) -> None:
    layers = snap["layers"]
    t = Table(title=f"cluster {snap['cluster']}: " + ("[green]healthy[/]" if snap["healthy"] else "[red]unhealthy[/]"))
    for col in ("layer", "health", "leader", "members"):
        t.add_column(col)
    dcs = layers["dcs"]
    t.add_row("dcs (etcd)", _mark(dcs["healthy"]), dcs["leader"] or "-",
              ", ".join(f"{m['node']}:{'up' if m['healthy'] else 'DOWN'}" for m in dcs["members"]))
    db = layers["database"]
    t.add_row("database (Patroni)", _mark(db["healthy"]), db["leader"] or "-",
              ", ".join(f"{m['node']}:{m['role'] or '-'}/{m['state']}" + (f" lag {m['lag_bytes']}B" if m["lag_bytes"] else "") for m in db["members"]))
    lb = layers["balancer"]
    t.add_row("balancer (HAProxy)", _mark(lb["healthy"]), "-",
              ", ".join(f"{m['node']}->{'/'.join(m['primary_up']) or 'nothing'}" for m in lb["members"]))
    pl = layers["pooler"]
    t.add_row("pooler (PgBouncer)", _mark(pl["healthy"]), "-",
              ", ".join(f"{m['node']}:" + ("PAUSED" if m["paused"] else f"{m['clients']} clients/{m['servers']} servers")
                        if m["reason"] is None or m["paused"] else f"{m['node']}:DOWN" for m in pl["members"]))
    br = layers["broker"]
    t.add_row("broker (RabbitMQ)", _mark(br["healthy"]), "-",
              ", ".join(f"{m['node']}:{'running' if m['running'] else 'DOWN'}" for m in br["members"])
              + "".join(f"; queue {q['name']}: leader {q['leader']}, {q['online']}/{q['members']} online" for q in br["quorum_queues"]))
    af = layers["airflow"]
    t.add_row("airflow", _mark(af["healthy"]), f"dag-processor: {af['dag_processor_holder'] or '-'}",
              "api " + ", ".join(f"{a['node']}:{'ok' if a['healthy'] else 'DOWN'}" for a in af["api_servers"])
              + f"; schedulers {len(af['schedulers'])}, triggerers {len(af['triggerers'])}, workers {len(af['workers'])}"
              + f"; DAGs {'agree' if af['dags']['agree'] else 'DIFFER'}")
    out.print(t)
    out.print("Airflow UI/API:        " + "  ".join(af["endpoints"]["api"]))
    out.print("PostgreSQL read-write: " + "  ".join(lb["endpoints"]["postgres_primary"]))
    out.print("PostgreSQL read-only:  " + "  ".join(lb["endpoints"]["postgres_replicas"]))
    out.print("AMQP (via balancers):  " + "  ".join(br["endpoints"]["amqp"]))
    for line in status_mod.problems(snap):
        out.print(f"[red]problem:[/] {line}", highlight=False)


@cli.group("node")
def node_group() -> None:
    """Node changes beyond `deploy` (which adds the nodes the spec gained)."""


@node_group.command("remove")
@spec_options
@click.argument("name")
@click.option("--yes", is_flag=True, help="Confirm: the node's configuration, data and logs on its server are deleted.")
@click.option("--server-gone", is_flag=True,
              help="Its server is dead for good: the other nodes drop it from every membership and nothing on "
                   "the server is touched (refused while it answers).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result: removed, server_touched, changed, elapsed_s.")
@handle_errors
def node_remove(spec_file: Path | None, state_dir: Path | None, name: str, yes: bool, server_gone: bool,
                as_json: bool) -> None:
    """Remove a node that was deleted from the spec: a full node hands over its roles first
    (primary, quorum queue replicas, RabbitMQ and etcd membership); then drain its worker, stop
    it, delete its files, and re-apply the rest of the cluster. With --server-gone only the
    cluster's side is done."""
    cluster = make_cluster(spec_file, state_dir, Progress(not as_json))
    cluster.check_removable(name)
    if not yes:
        what = "drops it from the cluster for good" if server_gone else \
            "deletes its configuration, data and task logs on its server"
        raise UserError(f"node remove {name} {what}; add --yes to confirm")
    with locked(cluster, "node remove"):
        result = cluster.remove_node(name, server_gone=server_gone)
    if as_json:
        out.print_json(json.dumps(result))
        return
    out.print(f"{name} removed from cluster [bold]{cluster.facts.name}[/] in {result['elapsed_s']}s")
    if server_gone:
        out.print(f"[yellow]{name}'s server was not touched: wipe it before it boots again (its haflow units would "
                  "start; the cluster no longer admits it)[/]")


@cli.group("lb")
def lb_group() -> None:
    """The external load balancer in front of the cluster (a cloud LB): what it needs, and a check of a real one."""


@lb_group.command("settings")
@spec_options
@click.option("--json", "as_json", is_flag=True, help="The settings as JSON (stable, docs/deploy.md).")
@handle_errors
def lb_settings(spec_file: Path | None, state_dir: Path | None, as_json: bool) -> None:
    """Targets, ports and health checks a load balancer in front of the cluster needs."""
    spec, _, _, _ = load_checked(spec_file, state_dir)
    result = lb.settings(ClusterFacts(spec))
    if as_json:
        out.print_json(json.dumps(result))
        return
    for svc in result["services"]:
        hc = svc["health_check"]
        out.print(f"[bold]{svc['name']}[/]: {svc['what']}")
        out.print(f"  listen TCP {svc['listen_port']} -> " + ", ".join(f"{t['address']}:{t['port']}" for t in svc["targets"]))
        out.print(f"  health check: HTTP GET :{hc['port']}{hc['path']} expect {hc['expect_status']}, every "
                  f"{hc['interval_s']} s, timeout {hc['timeout_s']} s, healthy after {hc['healthy_threshold']}, "
                  f"unhealthy after {hc['unhealthy_threshold']}")
        out.print("  close connections to an unhealthy target: " + ("yes" if svc["close_connections_to_unhealthy_targets"] else "no"))
    out.print(result["clients"])


@lb_group.command("check")
@spec_options
@click.argument("endpoint", metavar="ADDRESS:PORT")
@click.option("--api", "api_url", metavar="URL", help="Also check the Airflow API through the balancer (e.g. http://10.0.0.10:8080).")
@click.option("--switchover", is_flag=True, help="Run a planned switchover and measure how the balancer follows it.")
@click.option("--json", "as_json", is_flag=True, help="The result as JSON: ok, reaches_primary, follow_s, old_connections_closed, ...")
@handle_errors
def lb_check(spec_file: Path | None, state_dir: Path | None, endpoint: str, api_url: str | None, switchover: bool,
             as_json: bool) -> None:
    """Verify a real balancer reaches the current primary; with --switchover, that it follows a new one. Exit 1 when not."""
    lb.parse_endpoint(endpoint)  # bad input first: exit 2
    cluster = make_cluster(spec_file, state_dir, Progress(not as_json))
    if switchover:
        with locked(cluster, "lb check"):
            result = lb.check(cluster, endpoint, api_url, switchover)
    else:
        result = lb.check(cluster, endpoint, api_url, switchover)
    if as_json:
        out.print_json(json.dumps(result))
    else:
        out.print(f"{endpoint} reaches {result['reached'] or 'nothing'}; the primary is {result['primary'] or 'none'}")
        if result["api_ok"] is not None:
            out.print(f"Airflow API through the balancer: {'healthy' if result['api_ok'] else 'NOT healthy'}")
        if result["follow_s"] is not None or result["switchover_s"] is not None:
            out.print(f"switchover took {_s(result['switchover_s'])}; the balancer followed the new primary "
                      f"{_s(result['follow_s'])} after it accepted writes; old connections closed: "
                      f"{result['old_connections_closed']}")
        for p in result["problems"]:
            out.print(f"[red]problem:[/] {escape(p)}", highlight=False)
        out.print("[green]ok[/]" if result["ok"] else "[red]FAILED[/]")
    sys.exit(0 if result["ok"] else 1)


@cli.group()
def lab() -> None:
    """Disposable Debian hosts (systemd-nspawn) on this machine, to try and test the SSH path. Root only."""


@lab.command("up")
@click.option("--nodes", type=click.Choice(["3", "5"]), default="3", show_default=True, help="How many hosts.")
@click.option("--release", type=click.Choice(list(lab_image.RELEASES)), default=lab_image.DEFAULT_RELEASE, show_default=True,
              help="Debian release of the hosts.")
@click.option("--balancer", is_flag=True,
              help="Add a host that stands in for a cloud load balancer (HAProxy configured only from `haflow lb settings`).")
@click.option("--spares", type=click.IntRange(0, 2), default=0, show_default=True,
              help="Extra hosts left out of the spec, to add to the cluster (e.g. as worker-only nodes).")
@click.option("--json", "as_json", is_flag=True, help="The hosts, the SSH key and the spec as JSON.")
@handle_errors
def lab_up(nodes: str, release: str, balancer: bool, spares: int, as_json: bool) -> None:
    """Build (once) the base image, start the private network and boot the hosts; idempotent."""
    result = Lab(say=Progress(not as_json)).up(int(nodes), release, balancer, spares)
    if as_json:
        out.print_json(json.dumps(result))
        return
    out.print(f"lab up in {result['elapsed_s']}s: " + ", ".join(f"{h['name']} {h['address']}" for h in result["hosts"]))
    out.print(f"SSH key: {result['key']}\nspec:    {result['spec']}")


@lab.command("status")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def lab_status(as_json: bool) -> None:
    """The lab's hosts and whether each runs; exit 1 when a host is down."""
    st = Lab().status()
    if as_json:
        out.print_json(json.dumps(st))
    elif not st["up"]:
        out.print("no lab (`haflow lab up` starts one)")
    else:
        for h in st["hosts"]:
            out.print(f"{h['name']:6} {h['address']:12} {h['role']:8} {'running' if h['running'] else 'DOWN'}")
    sys.exit(0 if st["up"] and all(h["running"] for h in st["hosts"]) else 1)


@lab.command("poweroff")
@click.argument("name")
@handle_errors
def lab_poweroff(name: str) -> None:
    """Power a host off hard: its init is SIGKILLed, every process of the host dies at once."""
    Lab().poweroff(name)
    out.print(f"{name} powered off")


@lab.command("start")
@click.argument("name")
@handle_errors
def lab_start(name: str) -> None:
    """Boot a powered-off host again (its disk kept); its enabled services start by themselves."""
    Lab().start(name)
    out.print(f"{name} started")


@lab.command("isolate")
@click.argument("name")
@click.option("--ports", metavar="LIST", help="Only TCP on these ports between it and the other hosts (e.g. 4369,25672-25674).")
@handle_errors
def lab_isolate(name: str, ports: str | None) -> None:
    """Cut a host off from every other host and from this machine (packets dropped, link up)."""
    Lab().isolate(name, ports)
    out.print(f"{name} isolated" + (f" on ports {ports}" if ports else "") + " (`haflow lab heal` reconnects it)")


@lab.command("heal")
@handle_errors
def lab_heal() -> None:
    """Reconnect every isolated host."""
    Lab().heal()
    out.print("every lab host reconnected")


@lab.command("down")
@handle_errors
def lab_down() -> None:
    """Stop and delete the hosts, remove the bridge, routes and nft tables; verify nothing is left."""
    result = Lab(say=Progress()).down()
    out.print(f"lab down in {result['elapsed_s']}s ({len(result['removed_hosts'])} hosts); nothing left "
              "(the base image stays cached)")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
