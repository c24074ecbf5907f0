"""The cluster spec: models, the embedded default, loading and validation.

Validation reports every problem at once, one line each, naming the field path and the fix
(`SpecError.details`). Nothing here touches the machine: checks against installed software
(e.g. is PostgreSQL 15 present?) belong to `prereqs`.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from collections import defaultdict
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from haflow.errors import SpecError

NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,30}")  # always fullmatch: `$` would let a trailing newline in
SUPPORTED_POSTGRES = range(13, 18 + 1)
PATRONI_RE = re.compile(r"4\.1\.\d{1,3}")
DEFAULT_SPEC_NAME = "default-spec.yaml"
ADDRESSES_ENV = "HAFLOW_ADDRESSES"
MAX_NODES = 16


def _bounded(lo: int, hi: int, unit: str = "", hint: str = "") -> Any:
    """An int field in [lo, hi]; the error names the range (and why, when it is not obvious)."""

    def check(v: int) -> int:
        if not lo <= v <= hi:
            raise ValueError(f"{v}{unit} is out of range; use {lo}-{hi}{unit}" + (f" ({hint})" if hint else ""))
        return v

    return Annotated[int, AfterValidator(check)]


class _Strict(BaseModel):
    # strict: a string or a boolean where a number belongs is an error, not silently converted
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


Port = _bounded(1, 65535, hint="a TCP port")
USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
HOST_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})")


class Ssh(_Strict):
    """How `haflow deploy` reaches a node: a user other than root means sudo."""

    user: str = "root"
    port: Port = 22
    key: str | None = None  # private key file, relative to the spec; None: the SSH agent and ~/.ssh
    host: str | None = None  # the address to connect to, when it is not the node's address
    known_hosts: str | None = None  # file of trusted host keys, relative to the spec; None: ~/.ssh/known_hosts

    @field_validator("user")
    @classmethod
    def _user(cls, v: str) -> str:
        if not USER_RE.fullmatch(v):
            raise ValueError(f"{_short(v)} is not a valid user name; use a Unix login such as root or admin")
        return v

    @field_validator("host")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        if v is not None and not HOST_RE.fullmatch(v):
            raise ValueError(f"{_short(v)} is not a host name or address; give the name or IP to connect to")
        return v

    @field_validator("key", "known_hosts")
    @classmethod
    def _key(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or "\0" in v):
            raise ValueError("give the path of a file")
        return v


class Control(_Strict):
    """Out-of-band control of a server, for the drills that a server cannot do to itself: power
    it off hard and on again, cut it off the network and heal it. Each is a command run on this
    (the control) machine, as a list of arguments; `{node}` and `{address}` in them are replaced.
    A hypervisor's or cloud's CLI (`virsh destroy`/`virsh start`, `qm stop`/`qm start`, ...) or the
    lab's (`haflow lab up` writes them)."""

    power_off: list[str] | None = None
    power_on: list[str] | None = None
    isolate: list[str] | None = None
    # only the RabbitMQ traffic between the server and the others ({ports}: the ports to cut,
    # e.g. 4369,25672-25674); healed by `heal`
    isolate_broker: list[str] | None = None
    heal: list[str] | None = None

    @field_validator("power_off", "power_on", "isolate", "isolate_broker", "heal")
    @classmethod
    def _argv(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or not v[0].strip()):
            raise ValueError("give the command as a non-empty list of arguments, e.g. [virsh, destroy, '{node}']")
        return v

    @model_validator(mode="after")
    def _pairs(self) -> "Control":
        for cut in ("isolate", "isolate_broker"):
            if getattr(self, cut) is not None and self.heal is None:
                raise ValueError(f"{cut} without heal: a drill must be able to undo what it does; give both")
        if self.heal is not None and self.isolate is None and self.isolate_broker is None:
            raise ValueError("heal without isolate (or isolate_broker): give the cut it undoes")
        if (self.power_off is None) != (self.power_on is None):
            given, missing = ("power_off", "power_on") if self.power_off is not None else ("power_on", "power_off")
            raise ValueError(f"{given} without {missing}: a drill must be able to undo what it does; give both")
        return self


# What a node runs besides its balancer (HAProxy, on every node). A full node runs all four: an
# etcd member (by default), a PostgreSQL member, a RabbitMQ node, Airflow's api-server, scheduler,
# triggerer and dag-processor candidate, and a Celery worker. A worker-only node adds task capacity
# without joining any quorum.
ROLES = ("database", "broker", "airflow", "worker")
WORKER_ONLY = ("worker",)


class Node(_Strict):
    name: str
    address: str
    roles: list[str] = Field(default_factory=lambda: list(ROLES))
    ssh: Ssh | None = None  # every node or none: a spec is all-local (`up`) or all-SSH (`deploy`)
    control: Control | None = None  # SSH nodes only: power and network control for the drills

    @field_validator("roles")
    @classmethod
    def _roles(cls, v: list[str]) -> list[str]:
        unknown = [r for r in v if r not in ROLES]
        if unknown:
            raise ValueError(f"{_short(unknown[0])} is not a role; roles are {', '.join(ROLES)}")
        if sorted(set(v)) != sorted(v):
            raise ValueError("a role is listed twice; list each once")
        if set(v) not in (set(ROLES), set(WORKER_ONLY)):
            raise ValueError(f"{', '.join(v) or 'no role'}: a node is either full (every role: remove `roles`) or "
                             "worker-only ([worker]); other mixes are not supported")
        return v

    @property
    def worker_only(self) -> bool:
        return set(self.roles) == set(WORKER_ONLY)

    @model_validator(mode="after")
    def _control_needs_ssh(self) -> "Node":
        if self.control is not None and self.ssh is None:
            raise ValueError("control is for servers reached over SSH (the drills on local nodes need none); "
                             "remove it or give the node `ssh`")
        return self

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError(f"{_short(v)} is not a valid node name; use lowercase letters, digits and '-', starting with a letter")
        return v

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        try:
            ip = ipaddress.ip_address(v)
        except ValueError:
            raise ValueError(f"{_short(v)} is not an IP address; give the node's IPv4 address, e.g. 10.0.0.11") from None
        if ip.version != 4:
            raise ValueError(f"{_short(v)}: only IPv4 addresses are supported for now")
        if ip.is_unspecified or ip in ipaddress.ip_network("0.0.0.0/8"):
            raise ValueError(f"{v} is not a node address; give the address the node's services bind to")
        if ip.is_multicast or ip.is_reserved:  # 224/4, 240/4 and the broadcast address
            raise ValueError(f"{v} is not a unicast address; give the node's own IPv4 address")
        return str(ip)


class Ports(_Strict):
    etcd_client: Port = 2379
    etcd_peer: Port = 2380
    patroni_api: Port = 8008
    postgres: Port = 5432
    pg_primary: Port = 5000
    pg_replicas: Port = 5001
    haproxy_stats: Port = 7000
    epmd: Port = 4369
    rabbitmq_amqp: Port = 5672
    rabbitmq_management: Port = 15672
    rabbitmq_dist: Port = 25672  # node i uses rabbitmq_dist + i
    amqp_balancer: Port = 5670
    airflow_api: Port = 8080
    api_balancer: Port = 8000
    pooler: Port = 6432
    worker_log_server: Port = 8793
    trigger_log_server: Port = 8794


class Etcd(_Strict):
    members: list[str] | None = None  # None: every node runs a member


class Database(_Strict):
    postgres_version: int | None = None  # None: the hosts' own release's (distros.py)
    patroni_version: str = "4.1.5"
    synchronous_mode: bool = True
    failsafe_mode: bool = True
    # Patroni refuses ttl < 20, loop_wait < 1, retry_timeout < 3; the upper bounds keep a
    # failover within an hour (etcd takes leases far longer, nobody wants them).
    ttl: _bounded(20, 3600, " s", "Patroni's minimum is 20") = 20
    loop_wait: _bounded(1, 600, " s") = 10
    retry_timeout: _bounded(3, 600, " s", "Patroni's minimum is 3") = 5
    maximum_lag_on_failover: _bounded(0, 2**40, " bytes") = 1048576
    parameters: dict[str, str | int | float | bool] = Field(default_factory=dict)
    # Networks whose clients may log in to PostgreSQL directly (not through a node's balancer):
    # the clients of an external load balancer that keeps their address, or the balancer itself
    # when it proxies (docs/deploy.md, external load balancer). The nodes are always allowed.
    allowed_clients: list[str] = Field(default_factory=list)

    @field_validator("allowed_clients")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        out = []
        for net in v:
            try:
                ip = ipaddress.ip_network(net, strict=True)
            except ValueError as e:
                raise ValueError(f"{_short(net)} is not a network ({e}); give one like 10.0.0.0/24 or 10.0.0.5/32") from None
            if ip.version != 4:
                raise ValueError(f"{net}: only IPv4 networks are supported for now")
            out.append(str(ip))
        return out

    @field_validator("postgres_version")
    @classmethod
    def _pg(cls, v: int | None) -> int | None:
        if v is not None and v not in SUPPORTED_POSTGRES:
            raise ValueError(f"PostgreSQL {v} is not supported; use one of 13-18 (Debian 12 ships 15)")
        return v

    @field_validator("patroni_version", mode="before")
    @classmethod
    def _patroni(cls, v: Any) -> str:
        if not isinstance(v, str) or not PATRONI_RE.fullmatch(v):
            raise ValueError(f"Patroni {_short(v)} is not supported; use a 4.1.x release such as 4.1.5 (as a string)")
        return v

    @model_validator(mode="after")
    def _timings(self) -> "Database":
        if self.loop_wait + 2 * self.retry_timeout > self.ttl:
            raise ValueError(
                f"loop_wait + 2*retry_timeout ({self.loop_wait} + 2*{self.retry_timeout}) exceeds ttl {self.ttl}; "
                "lower them or raise database.ttl (Patroni requires loop_wait + 2*retry_timeout <= ttl)"
            )
        return self


class Balancer(_Strict):
    check_interval_ms: _bounded(100, 60000, " ms", "1000 is the measured default") = 1000
    fall: _bounded(1, 10) = 2
    rise: _bounded(1, 10) = 1


class Pooler(_Strict):
    # PgBouncer on every node in front of its balancer, transaction pooling: Airflow's
    # connections go through it, and a switchover pauses it so no client sees the change.
    pool_size: _bounded(1, 1000, "", "server connections per node, shared by its Airflow processes") = 20
    max_client_conn: _bounded(10, 100000) = 1000
    # A switchover pauses every pooler first; a transaction that stays open longer than this
    # (PAUSE waits for it) lets the switchover go on unpaused rather than wait on it.
    pause_timeout_s: _bounded(1, 120, " s") = 10


class Broker(_Strict):
    # A task's message stays unacknowledged while the task runs (acks_late): RabbitMQ closes a
    # consumer that holds one longer than this. It must outlast the longest task.
    consumer_timeout_s: _bounded(60, 30 * 86400, " s", "it must outlast the longest task") = 8 * 3600
    # How long RabbitMQ nodes take to notice a peer that answers nothing (power loss, partition):
    # with Erlang's 60 s default up to 75 s; the RabbitMQ team's own partition tests use 15. (On
    # the lab it did not shorten the partition drill's task-flow gap: docs/drills.md.)
    net_ticktime_s: _bounded(5, 120, " s", "15 is what RabbitMQ's partition tests use") = 15


AIRFLOW_RE = re.compile(r"3\.3\.\d{1,3}")
DAY = 86400


class Airflow(_Strict):
    version: str = "3.3.2"
    dags: str | None = None  # a DAG folder (relative to the spec); None: the shipped examples
    worker_concurrency: _bounded(1, 64) = 3
    # task processes a worker keeps while idle; it forks more, up to worker_concurrency, as
    # tasks arrive (Celery's autoscaler), and lets them go after 30 s without demand: each
    # holds ~100 MiB once it has run a task
    worker_idle_processes: _bounded(1, 64) = 1
    api_workers: _bounded(1, 16, hint="uvicorn workers, ~290 MiB each") = 1
    parallelism: _bounded(1, 1024) = 32
    task_execution_timeout_s: _bounded(1, 30 * DAY - 60, " s") = 6 * 3600  # the longest a task may run
    task_retries: _bounded(0, 20) = 2
    task_retry_delay_s: _bounded(0, DAY, " s") = 10
    task_queued_timeout_s: _bounded(1, DAY, " s") = 120
    # a running task whose worker died is failed (and retried) after this; it must outlast a
    # database failover (about 20 s), when no heartbeat can be written
    task_heartbeat_timeout_s: _bounded(45, DAY, " s", "at least 45: running tasks stop heartbeating during a database failover") = 60
    dag_processor_lease_ttl_s: _bounded(5, 120, " s", "a dead node's dag-processor is replaced after about this") = 10
    # fab: users and roles in the database every api-server shares (production); simple: one
    # admin from a file, for trying things out
    auth_manager: Literal["fab", "simple"] = "fab"

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, v: Any) -> str:
        if not isinstance(v, str) or not AIRFLOW_RE.fullmatch(v):
            raise ValueError(f"Airflow {_short(v)} is not supported; use a 3.3.x release such as 3.3.2 (as a string)")
        shipped = shipped_airflow_versions()
        if v not in shipped:
            raise ValueError(f"Airflow {v}: haflow ships a constraints file only for {', '.join(shipped)}; use one of those")
        return v

    @model_validator(mode="after")
    def _idle_processes(self) -> "Airflow":
        if self.worker_idle_processes > self.worker_concurrency:
            raise ValueError(
                f"worker_idle_processes ({self.worker_idle_processes}) exceeds worker_concurrency "
                f"({self.worker_concurrency}); lower it or raise worker_concurrency")
        return self

    @field_validator("dags")
    @classmethod
    def _dags(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("empty; give your DAG folder (relative to the spec) or null for haflow's examples")
        return v


def shipped_airflow_versions() -> list[str]:
    """Airflow versions haflow has a constraints file for (data/constraints-airflow-X.txt)."""
    names = [p.name for p in resources.files("haflow").joinpath("data").iterdir()]
    return sorted(n.removeprefix("constraints-airflow-").removesuffix(".txt") for n in names
                  if n.startswith("constraints-airflow-") and n.endswith(".txt"))


class Spec(_Strict):
    cluster: str
    nodes: list[Node]
    ports: Ports = Field(default_factory=Ports)
    etcd: Etcd = Field(default_factory=Etcd)
    database: Database = Field(default_factory=Database)
    balancer: Balancer = Field(default_factory=Balancer)
    pooler: Pooler = Field(default_factory=Pooler)
    broker: Broker = Field(default_factory=Broker)
    airflow: Airflow = Field(default_factory=Airflow)

    @field_validator("cluster")
    @classmethod
    def _cluster(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError(f"{_short(v)} is not a valid cluster name; use lowercase letters, digits and '-', starting with a letter")
        return v

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        known = ", ".join(n.name for n in self.nodes)
        from haflow.errors import UserError

        raise UserError(f"unknown node {name!r}; the spec's nodes are: {known}")

    @property
    def etcd_members(self) -> list[Node]:
        names = self.etcd.members if self.etcd.members is not None else [n.name for n in self.full_nodes]
        return [n for n in self.nodes if n.name in names]

    @property
    def full_nodes(self) -> list[Node]:
        """The nodes that run the quorums (database, broker) and Airflow's control plane."""
        return [n for n in self.nodes if not n.worker_only]


# --- PostgreSQL parameters ----------------------------------------------------------------------

PG_PARAMETER_RE = re.compile(r"[a-z_][a-z0-9_.]{0,62}")
# Set by haflow or Patroni for every node; a cluster-wide value would break replication or routing.
PG_MANAGED = {"listen_addresses", "port", "unix_socket_directories", "data_directory", "hba_file", "ident_file",
              "config_file", "wal_level", "hot_standby", "wal_log_hints", "cluster_name", "primary_conninfo",
              "primary_slot_name", "synchronous_standby_names"}
PG_INCLUDES = {"include", "include_dir", "include_if_exists"}
# Types of the parameters users set most; Patroni checks the rest (and drops what PostgreSQL would
# refuse, with a warning in its log). (min, max) as PostgreSQL's GUC tables give them.
PG_INTEGERS = {"max_connections": (1, 262143), "max_wal_senders": (0, 262143), "max_replication_slots": (0, 262143),
               "max_worker_processes": (0, 262143), "max_parallel_workers": (0, 1024),
               "superuser_reserved_connections": (0, 262143), "max_locks_per_transaction": (10, 2**31 - 1)}
PG_MEMORY = {"shared_buffers", "work_mem", "maintenance_work_mem", "effective_cache_size", "wal_keep_size",
             "max_wal_size", "min_wal_size", "temp_buffers", "wal_buffers"}
PG_MEMORY_RE = re.compile(r"[1-9][0-9]{0,9}\s*(B|kB|MB|GB|TB)?")


def pg_parameter_problems(name: str, value: Any) -> list[str]:
    """Why a database.parameters entry would break what haflow guarantees (empty if it is fine)."""
    where = f"database.parameters.{name}" if PG_PARAMETER_RE.fullmatch(name) else f"database.parameters[{_short(name)}]"
    text = str(value).strip().lower()
    if not PG_PARAMETER_RE.fullmatch(name):
        return [f"{where}: not a PostgreSQL parameter name; use lowercase letters, digits and '_'"]
    if name in PG_INCLUDES:
        return [f"{where}: include directives pull in a file haflow does not manage on every node; "
                "set the parameters themselves here"]
    if name.endswith("_command"):
        return [f"{where}: shell commands run by PostgreSQL (archiving, restore) are not managed by haflow "
                "and could break failover and pg_rewind; remove it"]
    if name in PG_MANAGED:
        return [f"{where}: set by haflow/Patroni on every node (replication and routing depend on it); remove it"]
    if name == "synchronous_commit" and text in ("off", "local", "false", "0", "no"):
        return [f"{where}: {_short(value)} acknowledges writes the standby does not have, which a failover "
                "loses; use on, remote_write or remote_apply"]
    if name == "password_encryption" and text != "scram-sha-256":
        return [f"{where}: {_short(value)} stores weak password hashes; haflow's accounts use scram-sha-256, remove it"]
    if name in ("fsync", "full_page_writes") and text in ("off", "false", "0", "no"):
        return [f"{where}: off risks a corrupt database after a crash; remove it"]
    return _pg_value_problems(where, name, value)


def _pg_value_problems(where: str, name: str, value: Any) -> list[str]:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool) and (name in PG_INTEGERS or name in PG_MEMORY):
        return [f"{where}: {_short(value)} is not a value PostgreSQL takes for it; give a number or a string"]
    if name in PG_INTEGERS:
        lo, hi = PG_INTEGERS[name]
        number = value if type(value) is int else int(value) if isinstance(value, str) and value.isdigit() else None
        if number is None or not lo <= number <= hi:
            return [f"{where}: {_short(value)} is not a whole number in {lo}-{hi}; PostgreSQL would refuse to start"]
    if name in PG_MEMORY:
        ok = (type(value) is int and 1 <= value < 2**31) or (isinstance(value, str) and PG_MEMORY_RE.fullmatch(value.strip()))
        if not ok:
            return [f"{where}: {_short(value)} is not a memory size; write it like 128MB (or a positive number of pages/kB)"]
    return []


# --- checks across fields ------------------------------------------------------------------------


def cross_field_problems(data: dict[str, Any]) -> list[str]:
    """Problems that involve several fields; each line starts with the field path.

    Works on the raw document so they are reported together with per-field errors, but only on
    values that are valid on their own (a port given as a string is reported once, as a type
    error, and never compared as a string)."""
    raw_nodes = data.get("nodes") if isinstance(data.get("nodes"), list) else []
    nodes = [n if isinstance(n, dict) else {} for n in raw_nodes]
    etcd = data.get("etcd") if isinstance(data.get("etcd"), dict) else {}
    problems: list[str] = []
    full = [n for n in nodes if not _is_worker_only(n)]
    if "nodes" in data and len(full) < 3:
        problems.append(f"nodes: {len(full)} full node(s) given; an HA cluster needs at least 3 that are not "
                        "worker-only (add nodes)")
    if len(nodes) > MAX_NODES:
        problems.append(f"nodes: {len(nodes)} nodes given; haflow runs at most {MAX_NODES}")
    problems += _duplicates(nodes, "name", lambda v: _valid(v, Node._name))
    problems += _duplicates(nodes, "address", lambda v: _valid(v, Node._address))
    problems += _ssh_mix_problems(nodes)
    names = [str(n.get("name")) for n in nodes]
    problems += _etcd_member_problems(etcd, names, [str(n.get("name")) for n in full])
    ports = _valid_ports(data.get("ports"))
    problems += _port_clashes(ports)
    problems += _derived_port_problems(ports, len(nodes))
    problems += _timeout_problems(data)
    db = data.get("database") if isinstance(data.get("database"), dict) else {}
    params = db.get("parameters") if isinstance(db.get("parameters"), dict) else {}
    problems += [p for name, value in params.items() for p in pg_parameter_problems(str(name), value)]
    return problems


def _ssh_mix_problems(nodes: list[dict[str, Any]]) -> list[str]:
    """A spec is all-local or all-SSH: one cluster cannot span this machine and remote hosts."""
    with_ssh = [i for i, n in enumerate(nodes) if n.get("ssh") is not None]
    if not with_ssh or len(with_ssh) == len(nodes):
        return []
    first_without = next(i for i in range(len(nodes)) if i not in with_ssh)
    return [f"nodes[{first_without}].ssh: missing while {len(with_ssh)} other node(s) have one; a spec is all-local "
            "or all-SSH: give every node `ssh` (for `haflow deploy`) or none (for `haflow up`)"]


def _valid(value: Any, validator: Any) -> Any:
    """`value` as its field validator returns it, or None when it is invalid on its own."""
    if not isinstance(value, str):
        return None
    try:
        return validator(value)
    except ValueError:
        return None


def _is_worker_only(node: dict[str, Any]) -> bool:
    roles = node.get("roles")
    return isinstance(roles, list) and set(roles) == set(WORKER_ONLY) and len(roles) == 1


def _etcd_member_problems(etcd: dict[str, Any], names: list[str], full: list[str]) -> list[str]:
    explicit = etcd.get("members")
    if explicit is not None and not isinstance(explicit, list):
        return []  # a type error, reported by the model
    if isinstance(explicit, list) and not explicit:
        return ["etcd.members: empty; list an odd number (3 or 5) of the nodes, or remove the key to use every node"]
    members = [m for m in explicit if isinstance(m, str)] if isinstance(explicit, list) else full
    problems = []
    for i, m in enumerate(members if isinstance(explicit, list) and names else []):
        if m not in names:
            problems.append(f"etcd.members[{i}]: {_short(m)} is not a node of this spec; use one of {', '.join(names)}")
        elif m not in full:
            problems.append(f"etcd.members[{i}]: {m} is a worker-only node; etcd members run on full nodes "
                            f"({', '.join(full)})")
    if len(set(members)) != len(members):
        problems.append("etcd.members: a node is listed twice; list each member once")
    if members and len(set(members)) % 2 == 0:
        where = "etcd.members" if isinstance(explicit, list) else "nodes"
        problems.append(
            f"{where}: {len(set(members))} etcd members is an even number; a quorum needs an odd count "
            "(3 or 5): set etcd.members to an odd subset of the nodes"
        )
    return problems


def _valid_ports(raw: Any) -> dict[str, int]:
    """The port plan with every port that is valid on its own (defaults for the rest)."""
    ports = Ports().model_dump()
    for field, value in (raw.items() if isinstance(raw, dict) else []):
        if field in ports and type(value) is int and 1 <= value <= 65535:
            ports[field] = value
    return ports


def _timeout_problems(data: dict[str, Any]) -> list[str]:
    broker = data.get("broker") if isinstance(data.get("broker"), dict) else {}
    airflow = data.get("airflow") if isinstance(data.get("airflow"), dict) else {}
    consumer = broker.get("consumer_timeout_s", Broker().consumer_timeout_s)
    task = airflow.get("task_execution_timeout_s", Airflow().task_execution_timeout_s)
    if type(consumer) is int and type(task) is int and consumer <= task:
        return [f"broker.consumer_timeout_s: {consumer} s does not outlast airflow.task_execution_timeout_s ({task} s); "
                "RabbitMQ would close the channel of a worker running a long task: set it above the task timeout"]
    return []


def _duplicates(nodes: list[dict[str, Any]], attr: str, normal: Any) -> list[str]:
    seen: dict[Any, int] = {}
    out = []
    for i, n in enumerate(nodes):
        v = normal(n.get(attr))
        if v is None:
            continue
        if v in seen:
            out.append(f"nodes[{i}].{attr}: {_short(v)} is already used by nodes[{seen[v]}]; every node needs its own {attr}")
        else:
            seen[v] = i
    return out


def _port_clashes(ports: dict[str, int]) -> list[str]:
    """Two services of one node on the same address and port can never both start."""
    by_port: dict[int, list[str]] = defaultdict(list)
    for field, port in ports.items():
        by_port[port].append(field)
    return [
        f"ports.{fields[1]}: port {port} is also used by ports.{fields[0]} on the same address; give each service its own port"
        for port, fields in by_port.items()
        if len(fields) > 1
    ]


def _derived_port_problems(ports: dict[str, int], n_nodes: int) -> list[str]:
    """RabbitMQ's distribution port is rabbitmq_dist + the node's index (nodes share one epmd)."""
    base = ports["rabbitmq_dist"]
    n = max(1, min(n_nodes, MAX_NODES))
    if base + n - 1 > 65535:
        return [f"ports.rabbitmq_dist: node {n - 1} would use {base + n - 1}, past 65535 (node i uses rabbitmq_dist + i); "
                f"use at most {65536 - n}"]
    others = {port: field for field, port in ports.items() if field != "rabbitmq_dist"}
    for i in range(1, n):  # i = 0 is the base port itself, checked with the others
        if base + i in others:
            return [f"ports.rabbitmq_dist: node {i} uses rabbitmq_dist + {i} = {base + i}, which is ports.{others[base + i]}; "
                    "move rabbitmq_dist or that port"]
    return []


# --- error messages ------------------------------------------------------------------------------

MAX_PROBLEMS = 40  # an error list never grows past this, whatever the spec holds
SHORT = 40


def _short(v: Any) -> str:
    """A value for an error line: repr'd (control characters visible), and cut to SHORT characters."""
    return _cut(repr(v), SHORT)


TYPE_NAMES = {bool: "a boolean", int: "a number", float: "a decimal number", str: "a string", list: "a list",
              dict: "a mapping", type(None): "null"}
EXPECTED = {"int_type": "a whole number", "string_type": "a string", "bool_type": "true or false",
            "list_type": "a list", "dict_type": "a mapping", "model_type": "a mapping", "float_type": "a number",
            "int_from_float": "a whole number"}


def _field_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if path else "") + str(part)
    return path or "spec"


def _friendly(err: dict[str, Any], model_fields: dict[str, list[str]]) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in ("int", "str", "float", "bool"))))
    path = _field_path(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = _field_path(loc[:-1])
        known = model_fields.get(_strip_indexes(parent), [])
        hint = f"; known keys here: {', '.join(known)}" if known else ""
        return f"{_field_path(loc[:-1] + (_short(loc[-1]).strip(chr(39)),))}: unknown key{hint}"
    if kind == "missing":
        return f"{path}: required field is missing; add it"
    if kind in EXPECTED:
        got = err.get("input")
        what = TYPE_NAMES.get(type(got), type(got).__name__)
        return f"{path}: expected {EXPECTED[kind]}, got {_short(got)} ({what}); write it as {EXPECTED[kind]}"
    msg = err["msg"]
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
    return f"{path}: {msg}"


def _strip_indexes(path: str) -> str:
    return re.sub(r"\[\d+\]", "", path)


def _known_keys() -> dict[str, list[str]]:
    """Field names per model path, for 'unknown key' hints."""
    return {
        "spec": list(Spec.model_fields),
        "nodes": list(Node.model_fields),
        "ports": list(Ports.model_fields),
        "etcd": list(Etcd.model_fields),
        "database": list(Database.model_fields),
        "balancer": list(Balancer.model_fields),
        "broker": list(Broker.model_fields),
        "airflow": list(Airflow.model_fields),
    }


CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def control_character_problems(data: Any, path: str = "") -> list[str]:
    """Every key or string value holding a control character (a newline included), by path."""
    problems = []
    if isinstance(data, dict):
        for k, v in data.items():
            sub = f"{path}.{k}" if path else str(k)
            if isinstance(k, str) and CONTROL_RE.search(k):
                problems.append(f"{path or 'spec'}: the key {_short(k)} contains a control character; remove it")
                continue
            problems += control_character_problems(v, sub)
    elif isinstance(data, list):
        for i, v in enumerate(data):
            problems += control_character_problems(v, f"{path}[{i}]")
    elif isinstance(data, str) and CONTROL_RE.search(data):
        problems.append(f"{path}: {_short(data)} contains a control character (a newline, tab, ...); remove it")
    return problems


def parse_spec(data: Any, source: str = "spec") -> Spec:
    """Validate a parsed YAML document; raise SpecError listing every problem."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: the spec must be a YAML mapping (cluster:, nodes:, ...)")
    lines: list[str] = control_character_problems(data)
    spec: Spec | None = None
    try:
        spec = Spec.model_validate(data)
    except ValidationError as e:
        known = _known_keys()
        lines += [_friendly(err, known) for err in e.errors()]
    lines += [p for p in cross_field_problems(data) if p not in lines]
    if lines or spec is None:
        lines = list(dict.fromkeys(lines))
        shown = lines[:MAX_PROBLEMS] + ([f"... and {len(lines) - MAX_PROBLEMS} more"] if len(lines) > MAX_PROBLEMS else [])
        raise SpecError(f"{source}: {len(lines)} problem(s) in the spec", details=shown)
    return spec


# --- reading a spec file -------------------------------------------------------------------------

MAX_SPEC_BYTES = 256 * 1024
MAX_DEPTH = 12  # the deepest real spec is 3 levels


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader, minus what has no place in a spec: duplicate keys (PyYAML keeps the
    last one silently), aliases (a few lines expand to gigabytes), and deep nesting (a
    RecursionError, not an error message)."""

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.constructor.ConstructorError(None, None, "YAML aliases (*name) are not allowed in a spec; "
                                                    "write the value out", mark)
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise yaml.constructor.ConstructorError(None, None, f"nested more than {MAX_DEPTH} levels deep",
                                                        self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(None, None, "a key must be a plain value", key_node.start_mark) from None
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {_short(key)}; keep one of them",
                                                        key_node.start_mark)
        return super().construct_mapping(node, deep)


_SpecLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _SpecLoader.construct_mapping)


def default_spec_text() -> str:
    return resources.files("haflow").joinpath("data", DEFAULT_SPEC_NAME).read_text()


def load_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"{source}:{where}: not valid YAML ({_cut(problem, 160)}); fix it") from None


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def read_spec_text(path: Path) -> str:
    """The spec file's text: a regular file, small, UTF-8 text (never blocks on a FIFO)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise SpecError(f"{path}: spec file not found; create one with `haflow init {path}`") from None
    except OSError as e:
        raise SpecError(f"{path}: cannot read the spec ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device or socket"
        raise SpecError(f"{path}: is {kind}, not a spec file; give the path of a YAML file")
    if st.st_size > MAX_SPEC_BYTES:
        raise SpecError(f"{path}: {st.st_size} bytes is too large for a spec (at most {MAX_SPEC_BYTES}); is it the right file?")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SpecError(f"{path}: cannot read the spec ({e.strerror})") from None
    if b"\0" in raw:
        raise SpecError(f"{path}: is a binary file (it holds NUL bytes), not a YAML spec")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise SpecError(f"{path}: line {line}: not UTF-8 text (byte {e.start}); save the spec as UTF-8") from None


def embedded_default() -> Spec:
    """The 3-node local cluster; HAFLOW_ADDRESSES=a,b,c moves its nodes to other addresses."""
    data = load_yaml(default_spec_text(), "embedded default spec")
    override = os.environ.get(ADDRESSES_ENV)
    if override:
        addresses = [a.strip() for a in override.split(",") if a.strip()]
        data["nodes"] = [{"name": f"node{i + 1}", "address": a} for i, a in enumerate(addresses)]
        data["etcd"]["members"] = [n["name"] for n in data["nodes"]]
    return parse_spec(data, f"embedded default spec ({ADDRESSES_ENV}={override})" if override else "embedded default spec")


def load_spec(path: Path | None) -> Spec:
    if path is None:
        return embedded_default()
    return parse_spec(load_yaml(read_spec_text(path), str(path)), str(path))


# --- paths the spec names ------------------------------------------------------------------------


def dags_folder(spec: Spec, spec_dir: Path | None) -> Path | None:
    """The spec's DAG folder, resolved against the spec's directory; None: haflow's examples."""
    if spec.airflow.dags is None:
        return None
    return ((spec_dir or Path.cwd()) / spec.airflow.dags).resolve()


def check_paths(spec: Spec, spec_dir: Path | None, state_dir: Path) -> None:
    """The DAG folder must exist and be unable to swallow the state directory: it is copied to
    every node, and `/` or a folder holding the state would copy databases and secrets."""
    try:
        folder = dags_folder(spec, spec_dir)
        is_dir = folder is not None and folder.is_dir()
    except OSError as e:  # a name too long, a loop of links
        raise SpecError(f"airflow.dags: cannot use it as a folder ({e.strerror}); point it at your DAG folder") from None
    if folder is None:
        return
    state = state_dir.resolve()
    problem = None
    if folder == Path("/"):
        problem = "is / ; give the folder that holds your DAG files"
    elif not is_dir:
        problem = f"{folder} is not an existing folder; create it or point airflow.dags at your DAG folder"
    elif state == folder or folder in state.parents:
        problem = f"{folder} contains the state directory {state} (databases, secrets); use a folder of DAG files only"
    elif state in folder.parents:
        problem = f"{folder} is inside the state directory {state}; keep your DAGs elsewhere"
    if problem:
        raise SpecError(f"airflow.dags: {problem}")
