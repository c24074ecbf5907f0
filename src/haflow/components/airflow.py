"""Airflow 3 on every node: api-server, scheduler, triggerer, Celery worker, and a dag-processor
candidate of which exactly one runs (chosen through an etcd lease, see data/dag_processor_elect.py).

All configuration is environment, built here as a dict per process (no shell, no env file to
source: broker URLs and JSON break those, P-A6). Every process of the cluster shares one fernet
key, JWT secret and API secret key. The database is reached through the node's pooler (PgBouncer), in front of its own balancer
primary port; the broker through the node's balancer AMQP port (one URL, so a dead RabbitMQ node
is never tried, P-A2); the Execution API through the node's balancer api port (P-A9).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import httpx

from haflow.components import etcd, haproxy, rabbitmq
from haflow.components.base import DesiredState, Directory, File, LayerStatus, Needs, Service, Venv, data_text
from haflow.facts import ClusterFacts, NodeFacts, NodeLayout
from haflow.secrets import Secrets
from haflow.spec import Airflow

NAME = "airflow"  # the component; its services are these:
API = "airflow-api-server"
SCHEDULER = "airflow-scheduler"
TRIGGERER = "airflow-triggerer"
WORKER = "airflow-worker"
DAG_PROCESSOR = "airflow-dag-processor"
SERVICES = (API, SCHEDULER, DAG_PROCESSOR, TRIGGERER, WORKER)
ROLE_OF = {API: "airflow", SCHEDULER: "airflow", DAG_PROCESSOR: "airflow", TRIGGERER: "airflow", WORKER: "worker"}
CONFIG_MODULE = "haflow_airflow"
SITE_MODULE = "sitecustomize.py"
ELECTOR = "dag_processor_elect.py"
ELECTOR_PASSWORD_ENV = "HAFLOW_ETCD_PASSWORD"
QUEUE = "default"
MIN_HEARTBEAT_INTERVAL_S = 1
SCHEDULER_IDLE_SLEEP_S = 2
DB_CONNECT_TIMEOUT_S = 10  # libpq connect_timeout of every Airflow database connection


def venv_dir_for(venvs: Path, version: str) -> Path:
    return venvs / f"airflow-{version}"


def venv_dir(layout: NodeLayout, version: str) -> Path:
    return venv_dir_for(layout.venvs, version)


def constraints_file(version: str) -> Path:
    return Path(str(resources.files("haflow").joinpath("data", f"constraints-airflow-{version}.txt")))


def constraints_digest(version: str) -> str:
    """Short digest of the shipped constraints: a new set of providers needs a new migration."""
    return hashlib.sha256(constraints_file(version).read_bytes()).hexdigest()[:10]


def requirements(version: str) -> list[str]:
    return [f"apache-airflow[celery,postgres]=={version}", "apache-airflow-providers-fab",
            "--constraint", str(constraints_file(version))]


def runs_on(node: NodeFacts) -> bool:
    return bool(node.roles & {"airflow", "worker"})


def needs(facts: ClusterFacts, layout: NodeLayout) -> Needs:
    version = facts.spec.airflow.version
    venv = Venv(venv_dir(layout, version), tuple(requirements(version)), layout.user(NAME))
    return Needs(venvs=(venv,), users=tuple(u for u in [layout.user(NAME), layout.user(WORKER_USER)] if u))


FAB_AUTH_MANAGER = "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"
SIMPLE_AUTH_MANAGER = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"


def auth_env(facts: ClusterFacts, layout: NodeLayout, secrets: Secrets) -> dict[str, str]:
    """FAB: users, roles and UI sessions in the database every api-server shares, the admin
    created by `up` (ensure_admin). Simple: one admin from a file, for trying things out."""
    if facts.spec.airflow.auth_manager == "fab":
        return {"AIRFLOW__CORE__AUTH_MANAGER": FAB_AUTH_MANAGER}
    return {
        "AIRFLOW__CORE__AUTH_MANAGER": SIMPLE_AUTH_MANAGER,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{secrets['airflow_admin'].username}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords_file(layout)),
    }


def home(layout: NodeLayout) -> Path:
    return layout.services / "airflow"


WORKER_USER = "airflow-worker"  # the Celery workers and the tasks they run


def worker_home(layout: NodeLayout) -> Path:
    """The workers' own AIRFLOW_HOME: tasks run as another user than the scheduler and the
    api-server, so they cannot read those processes' files or /proc/PID/environ."""
    return layout.services / WORKER_USER


def dags_dir(layout: NodeLayout) -> Path:
    """A symlink to the current copy of the DAG folder (swapped atomically by `dags push`),
    readable by the `airflow` group: every Airflow process, workers included."""
    return layout.services / "airflow-dags" / "dags"


def passwords_file(layout: NodeLayout) -> Path:
    return home(layout) / "simple_auth_manager_passwords.json"


def worker_name(facts: ClusterFacts, node: str) -> str:
    """The Celery node name of a node's worker (it contains '@', so Celery uses it as is)."""
    return f"{node}@{facts.name}"


def dag_processor_key(facts: ClusterFacts) -> str:
    return etcd.dag_processor_key(facts)


def database_url(facts: ClusterFacts, secrets: Secrets, endpoint: str, scheme: str = "postgresql+psycopg") -> str:
    """The airflow role's URL of the Airflow database at `endpoint` (HOST:PORT: a pooler, or a
    balancer's read-write port)."""
    # connect_timeout: a connection opened through the local balancer in the second or two
    # between the primary's server dying and its health check failing hangs there without any
    # timer (HAProxy 3.0; measured on the lab: surviving schedulers and triggerers stalled
    # ~130 s after a power-off); libpq gives up on it and the pool opens another.
    db = secrets["postgres_airflow"]
    return f"{scheme}://{db.username}:{db.password}@{endpoint}/{facts.airflow_db}?connect_timeout={DB_CONNECT_TIMEOUT_S}"


def env(facts: ClusterFacts, node: NodeFacts, layout: NodeLayout, secrets: Secrets) -> dict[str, str]:
    spec = facts.spec
    af = spec.airflow
    mq = secrets["rabbitmq_airflow"]
    h = home(layout)
    # Airflow's own connections go through the node's pooler (components/pgbouncer.py)
    sql = database_url(facts, secrets, node.pooler)
    return {
        "AIRFLOW_HOME": str(h),
        "HOME": str(h),
        "HAFLOW_NODE": node.name,
        "PYTHONPATH": str(h / "config"),
        "PATH": f"{venv_dir(layout, af.version)}/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": f"{CONFIG_MODULE}.hostname",
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags_dir(layout)),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CORE__FERNET_KEY": secrets.key("airflow_fernet_key"),
        "AIRFLOW__CORE__PARALLELISM": str(af.parallelism),
        "AIRFLOW__CORE__DEFAULT_TASK_EXECUTION_TIMEOUT": str(af.task_execution_timeout_s),
        # A task lost in a failover is retried, not left failed.
        "AIRFLOW__CORE__DEFAULT_TASK_RETRIES": str(af.task_retries),
        "AIRFLOW__CORE__DEFAULT_TASK_RETRY_DELAY": str(af.task_retry_delay_s),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://{node.api_balancer}/execution/",
        **auth_env(facts, layout, secrets),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": sql,
        # The async engine too, with psycopg rather than asyncpg, whose statement cache a
        # transaction pooler breaks; neither may prepare statements (POOLED_CONNECT_ARGS).
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": sql,
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS": f"{CONFIG_MODULE}.POOLED_CONNECT_ARGS",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS_ASYNC": f"{CONFIG_MODULE}.POOLED_CONNECT_ARGS",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_POOL_PRE_PING": "True",
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.key("airflow_jwt_secret"),
        "AIRFLOW__API__SECRET_KEY": secrets.key("airflow_api_secret_key"),
        "AIRFLOW__API__BASE_URL": f"http://{node.api_balancer}",
        "AIRFLOW__API__WORKERS": str(af.api_workers),
        # A task queued on a worker that died with its broker connection is failed and retried
        # after this, instead of staying queued forever (apache/airflow#30375).
        "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": str(af.task_queued_timeout_s),
        # A task whose worker died keeps its "running" state until its heartbeat is this old
        # (default 300 s); then it is failed and retried.
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(af.task_heartbeat_timeout_s),
        # A scheduler loop that found nothing to do sleeps this long: each idle loop is a round
        # of database queries, and every node runs a scheduler (docs/benchmarks.md, idle).
        "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": str(SCHEDULER_IDLE_SLEEP_S),
        # Each Celery worker otherwise keeps a whole Airflow interpreter (~85 MiB) that looks
        # for stale versions of versioned DAG bundles; haflow's DAG folder is a local,
        # unversioned bundle, so there is never one to remove.
        "AIRFLOW__DAG_PROCESSOR__STALE_BUNDLE_CLEANUP_INTERVAL": "0",
        # The task supervisor notices its task process's exit only between select() waits of
        # this length: when the process's sockets close before it has exited, a finished task
        # holds its slot for the whole wait (a third of the no-op tasks took 5.1 s instead of
        # 0.1 s at the default 5). 1 s bounds that and costs one heartbeat per running task per
        # second (docs/benchmarks.md).
        "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": str(MIN_HEARTBEAT_INTERVAL_S),
        "AIRFLOW__CELERY__BROKER_URL": f"amqp://{mq.username}:{mq.password}@{node.amqp_balancer}/airflow",
        "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{sql}",
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(af.worker_concurrency),
        "AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS": f"{CONFIG_MODULE}.CELERY_CONFIG",
        "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__CONFIRM_PUBLISH": "True",
        # Where the canary DAG's tasks record their executions (haflow drill).
        "HAFLOW_CANARY_DSN": database_url(facts, secrets, node.pg_primary, scheme="postgresql"),
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(layout.task_logs),
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(facts.worker_log_port(node.name)),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(facts.trigger_log_port(node.name)),
    }


def migrate_env(facts: ClusterFacts, node: NodeFacts, layout: NodeLayout, secrets: Secrets) -> dict[str, str]:
    """`airflow db migrate` holds a session-level advisory lock, which a transaction pooler
    cannot keep: it goes straight to the node's balancer."""
    direct = database_url(facts, secrets, node.pg_primary)
    return {**env(facts, node, layout, secrets), "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": direct,
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": direct}


# What a Celery worker, and so every task it runs, must not hold: tasks reach connections and
# variables through the Execution API with a token the scheduler signed, never decrypt them and
# never sign tokens themselves. (The database URL stays: the worker writes Celery results there
# as the airflow role.)
WORKER_WITHHELD = ("AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY")


def worker_env(full: dict[str, str], layout: NodeLayout) -> dict[str, str]:
    h = worker_home(layout)
    own = {"AIRFLOW_HOME": str(h), "HOME": str(h), "PYTHONPATH": str(h / "config")}
    return {k: own.get(k, v) for k, v in full.items() if k not in WORKER_WITHHELD}


def autoscale(af: Airflow) -> list[str]:
    """Celery's autoscaler keeps `worker_idle_processes` task processes while idle and forks up
    to `worker_concurrency` as task messages arrive (the worker prefetches for the full
    concurrency); haflow_airflow.IdleAutoscaler lets the extra ones go after 30 s without demand
    (docs/benchmarks.md, idle and throughput)."""
    if af.worker_idle_processes >= af.worker_concurrency:
        return []
    return ["--autoscale", f"{af.worker_concurrency},{af.worker_idle_processes}"]


FAB_ADMIN_SCRIPT = "fab_admin.py"


def admin_command(facts: ClusterFacts, layout: NodeLayout, secrets: Secrets) -> tuple[list[str], dict[str, str]]:
    """argv and extra environment that create (or repair) the FAB admin from the secrets."""
    admin = secrets["airflow_admin"]
    argv = [str(venv_dir(layout, facts.spec.airflow.version) / "bin/python"), str(home(layout) / FAB_ADMIN_SCRIPT),
            admin.username, f"{admin.username}@{facts.name}.invalid"]
    return argv, {"HAFLOW_ADMIN_PASSWORD": admin.password}


def passwords_json(secrets: Secrets) -> str:
    admin = secrets["airflow_admin"]
    return json.dumps({admin.username: admin.password})


def render(facts: ClusterFacts, node: NodeFacts, layout: NodeLayout, secrets: Secrets) -> DesiredState:
    af = facts.spec.airflow
    h = home(layout)
    venv = venv_dir(layout, af.version)
    airflow = str(venv / "bin/airflow")
    e = env(facts, node, layout, secrets)
    config_module = h / "config" / f"{CONFIG_MODULE}.py"
    elector = h / ELECTOR
    user = layout.user("airflow")
    worker_user = layout.user(WORKER_USER)
    wh = worker_home(layout)
    files = [
        File(config_module, data_text(f"{CONFIG_MODULE}.py"), 0o644, user),
        File(wh / "config" / f"{CONFIG_MODULE}.py", data_text(f"{CONFIG_MODULE}.py"), 0o644, worker_user),
        # a fast exit: the interpreter's final garbage collection skipped (data/sitecustomize.py)
        File(h / "config" / SITE_MODULE, data_text(SITE_MODULE), 0o644, user),
        File(wh / "config" / SITE_MODULE, data_text(SITE_MODULE), 0o644, worker_user),
        File(elector, data_text(ELECTOR), 0o644, user),
        File(h / FAB_ADMIN_SCRIPT, data_text(FAB_ADMIN_SCRIPT), 0o644, user),
    ]
    if af.auth_manager == "simple":
        files.append(File(passwords_file(layout), passwords_json(secrets), 0o600, user))
    restart = tuple(f.path for f in files)
    etcd_urls = [arg for m in facts.etcd_members for arg in ("--etcd", m.etcd_client_url)]
    skip_logs = [] if layout.serve_task_logs else ["--skip-serve-logs"]

    def svc(name: str, argv: list[str], stop_timeout_s: int = 30, environment: dict[str, str] = e,
            as_user: str | None = user, cwd: Path = h) -> Service:
        return Service(name=name, argv=tuple(argv), env=environment, user=as_user, cwd=cwd, stop_timeout_s=stop_timeout_s,
                       restart_files=restart, after=(haproxy.NAME, rabbitmq.NAME))

    return DesiredState(
        dirs=[
            Directory(h, 0o700, user), Directory(h / "config", 0o755, user),
            Directory(wh, 0o700, worker_user), Directory(wh / "config", 0o755, worker_user),
            # group `airflow` (the workers' too): DAG copies are read, task logs written by
            # workers and read by api-servers; setgid keeps new log folders in the group
            Directory(dags_dir(layout).parent, 0o750, user),
            Directory(layout.task_logs, 0o2770, user, group_tree=True),
        ],
        files=files,
        services=[s for s in [
            svc(API, [airflow, "api-server", "--host", node.address, "--port", str(facts.spec.ports.airflow_api),
                      "--workers", str(af.api_workers)]),
            svc(SCHEDULER, [airflow, "scheduler"]),
            # its etcd password in its environment, never in argv (ps) nor passed on to the
            # dag-processor, which runs DAG files' code
            svc(DAG_PROCESSOR, [str(venv / "bin/python"), str(elector), *etcd_urls, "--key", dag_processor_key(facts),
                                "--user", secrets["etcd_elector"].username,
                                "--node", node.name, "--ttl", str(af.dag_processor_lease_ttl_s), "--", airflow, "dag-processor"],
                stop_timeout_s=40, environment={**e, ELECTOR_PASSWORD_ENV: secrets["etcd_elector"].password}),
            svc(TRIGGERER, [airflow, "triggerer", *skip_logs], stop_timeout_s=60),
            # Warm shutdown lets running tasks finish: the grace period is as long as a task may run.
            svc(WORKER, [airflow, "celery", "worker", "--celery-hostname", worker_name(facts, node.name),
                         "--queues", QUEUE, "--concurrency", str(af.worker_concurrency), *autoscale(af),
                         "--without-gossip", "--without-mingle", *skip_logs],  # Airflow uses neither
                stop_timeout_s=min(af.task_execution_timeout_s, 600), environment=worker_env(e, layout),
                as_user=worker_user, cwd=wh),
        ] if ROLE_OF[s.name] in node.roles],
    )


# --- DAG folder ---------------------------------------------------------------------------------


# --- probes -----------------------------------------------------------------------------------


def api_health(node: NodeFacts, timeout: float = 3.0) -> dict[str, Any] | None:
    try:
        r = httpx.get(f"http://{node.airflow_api}/api/v2/monitor/health", timeout=timeout)
        return r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def layer_jobs(facts: ClusterFacts, secrets: Secrets, endpoint: str) -> list[dict[str, Any]]:
    """Running scheduler/triggerer/dag-processor jobs with their heartbeat age, from the database
    (each job's hostname is its node's name, see data/haflow_airflow.py)."""
    import psycopg

    from haflow.components import postgres

    try:
        with postgres.connect_airflow(facts, secrets, endpoint) as conn:
            rows = conn.execute(
                "SELECT job_type, hostname, extract(epoch FROM now() - latest_heartbeat) FROM job "
                "WHERE state = 'running' AND job_type IN ('SchedulerJob', 'TriggererJob', 'DagProcessorJob')"
            ).fetchall()
    except psycopg.Error:
        return []
    return [{"type": t, "node": h, "heartbeat_age_s": round(float(age), 1)} for t, h, age in rows]


def dag_processor_holder(facts: ClusterFacts) -> str | None:
    return etcd.get_key(facts, dag_processor_key(facts))


def ping_workers(facts: ClusterFacts, secrets: Secrets, timeout: float = 2.0) -> list[str]:
    """Celery worker names that answer a broadcast ping through the broker."""
    from celery import Celery

    mq = secrets["rabbitmq_airflow"]
    for node in facts.nodes:  # every node's balancer reaches the broker
        app = Celery(broker=f"amqp://{mq.username}:{mq.password}@{node.amqp_balancer}/airflow")
        app.conf.broker_connection_retry = False
        app.conf.broker_connection_timeout = 2
        try:
            # every worker node runs one worker: stop waiting once all answered (else the full timeout)
            replies = app.control.ping(timeout=timeout, limit=len(facts.worker_nodes)) or []
            return sorted(name for reply in replies for name in reply)
        except Exception:  # this balancer's broker route is down: ask through the next node
            continue
        finally:
            app.close()
    return []


def dag_problems(dags: dict[str, Any]) -> list[str]:
    """What the DAG folders' status says is wrong (dags.Dags.status)."""
    if dags.get("unreachable"):
        return [f"cannot read the DAG folder on {', '.join(dags['unreachable'])} (its server does not answer)"]
    return [] if dags.get("agree") else ["DAG folders differ between nodes (`haflow dags push`)"]


JOB_TYPES = {"SchedulerJob": "schedulers", "TriggererJob": "triggerers", "DagProcessorJob": "dag_processors"}
HEARTBEAT_STALE_S = 30


@dataclass(frozen=True)
class ApiServerHealth:
    node: str
    healthy: bool


@dataclass(frozen=True)
class JobHeartbeat:
    node: str | None
    heartbeat_age_s: float


@dataclass(frozen=True)
class AirflowStatus(LayerStatus):
    api_servers: tuple[ApiServerHealth, ...]
    schedulers: tuple[JobHeartbeat, ...]
    triggerers: tuple[JobHeartbeat, ...]
    dag_processors: tuple[JobHeartbeat, ...]
    dag_processor_holder: str | None
    workers: tuple[str, ...]
    endpoints: dict[str, list[str]]
    dags: dict[str, Any]

    @classmethod
    def unknown(cls, facts: ClusterFacts, dags: dict[str, Any], reason: str) -> "AirflowStatus":
        return cls(healthy=False, problems=(reason,), api_servers=(), schedulers=(), triggerers=(), dag_processors=(),
                   dag_processor_holder=None, workers=(), endpoints={"api": facts.api_urls}, dags=dags)


def probe(facts: ClusterFacts, secrets: Secrets, dags: dict[str, Any], endpoint: str) -> AirflowStatus:
    """Layer status: api-servers with health; schedulers, dag-processors and triggerers with
    their last heartbeat age; the dag-processor lease holder; Celery workers that answer; DAGs."""
    api = tuple(ApiServerHealth(n.name, api_health(n) is not None) for n in facts.airflow_nodes)
    jobs = layer_jobs(facts, secrets, endpoint)
    groups: dict[str, list[JobHeartbeat]] = {v: [] for v in JOB_TYPES.values()}
    for j in sorted(jobs, key=lambda j: (j["node"] or "", j["heartbeat_age_s"])):
        groups[JOB_TYPES[j["type"]]].append(JobHeartbeat(j["node"], j["heartbeat_age_s"]))
    workers = ping_workers(facts, secrets)
    expected_workers = [worker_name(facts, n.name) for n in facts.worker_nodes]
    problems = [f"api-server on {a.node} not healthy" for a in api if not a.healthy]
    for kind in ("schedulers", "triggerers"):
        fresh = {j.node for j in groups[kind] if j.heartbeat_age_s < HEARTBEAT_STALE_S}
        missing = [n.name for n in facts.airflow_nodes if n.name not in fresh]
        if missing:
            problems.append(f"{kind[:-1]} without a fresh heartbeat on {', '.join(missing)}")
    fresh_dp = [j for j in groups["dag_processors"] if j.heartbeat_age_s < HEARTBEAT_STALE_S]
    if len(fresh_dp) != 1:
        problems.append(f"{len(fresh_dp)} dag-processors with a fresh heartbeat (want exactly 1)")
    missing_workers = [w for w in expected_workers if w not in workers]
    if missing_workers:
        problems.append(f"Celery workers not answering: {', '.join(missing_workers)}")
    problems += dag_problems(dags)
    return AirflowStatus(healthy=not problems, problems=tuple(problems), api_servers=api,
                         schedulers=tuple(groups["schedulers"]), triggerers=tuple(groups["triggerers"]),
                         dag_processors=tuple(groups["dag_processors"]), dag_processor_holder=dag_processor_holder(facts),
                         workers=tuple(workers), endpoints={"api": facts.api_urls}, dags=dags)
