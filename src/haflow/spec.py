"""The cluster spec: models, the embedded default, loading and validation.

Validation reports every problem at once, one line each, naming the field path and the fix
(`SpecError.details`). Nothing here touches the machine: checks against installed software
(e.g. is PostgreSQL 15 present?) belong to `prereqs`.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections import defaultdict
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from haflow.errors import SpecError

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
SUPPORTED_POSTGRES = range(13, 18 + 1)
PATRONI_RE = re.compile(r"^4\.1\.\d+$")
DEFAULT_SPEC_NAME = "default-spec.yaml"
ADDRESSES_ENV = "HAFLOW_ADDRESSES"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Node(_Strict):
    name: str
    address: str

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"{v!r} is not a valid node name; use lowercase letters, digits and '-', starting with a letter")
        return v

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        try:
            ip = ipaddress.ip_address(v)
        except ValueError:
            raise ValueError(f"{v!r} is not an IP address; give the node's IPv4 address, e.g. 10.0.0.11") from None
        if ip.version != 4:
            raise ValueError(f"{v!r}: only IPv4 addresses are supported for now")
        if ip.is_unspecified:
            raise ValueError("0.0.0.0 is not a node address; give the address the node's services bind to")
        return v


class Ports(_Strict):
    etcd_client: int = 2379
    etcd_peer: int = 2380
    patroni_api: int = 8008
    postgres: int = 5432
    pg_primary: int = 5000
    pg_replicas: int = 5001
    haproxy_stats: int = 7000
    epmd: int = 4369
    rabbitmq_amqp: int = 5672
    rabbitmq_management: int = 15672
    rabbitmq_dist: int = 25672
    amqp_balancer: int = 5670
    airflow_api: int = 8080
    api_balancer: int = 8000
    worker_log_server: int = 8793
    trigger_log_server: int = 8794

    @field_validator("*")
    @classmethod
    def _port(cls, v: int) -> int:
        if not 1 <= v <= 65535:
            raise ValueError(f"{v} is not a TCP port; use 1-65535")
        return v


class Etcd(_Strict):
    members: list[str] | None = None  # None: every node runs a member


class Database(_Strict):
    postgres_version: int = 15
    patroni_version: str = "4.1.5"
    synchronous_mode: bool = True
    failsafe_mode: bool = True
    ttl: int = 20
    loop_wait: int = 10
    retry_timeout: int = 5
    maximum_lag_on_failover: int = 1048576
    parameters: dict[str, str | int | float | bool] = Field(default_factory=dict)

    @field_validator("postgres_version")
    @classmethod
    def _pg(cls, v: int) -> int:
        if v not in SUPPORTED_POSTGRES:
            raise ValueError(f"PostgreSQL {v} is not supported; use one of 13-18 (Debian 12 ships 15)")
        return v

    @field_validator("patroni_version")
    @classmethod
    def _patroni(cls, v: Any) -> str:
        v = str(v)
        if not PATRONI_RE.match(v):
            raise ValueError(f"Patroni {v!r} is not supported; use a 4.1.x release such as 4.1.5")
        return v

    @model_validator(mode="after")
    def _timings(self) -> "Database":
        if self.ttl < 20:
            raise ValueError(f"ttl {self.ttl} is below Patroni's minimum of 20 seconds; set database.ttl >= 20")
        if self.loop_wait < 1 or self.retry_timeout < 3:
            raise ValueError("loop_wait must be >= 1 and retry_timeout >= 3 seconds")
        if self.loop_wait + 2 * self.retry_timeout > self.ttl:
            raise ValueError(
                f"loop_wait + 2*retry_timeout ({self.loop_wait} + 2*{self.retry_timeout}) exceeds ttl {self.ttl}; "
                "lower them or raise database.ttl (Patroni requires loop_wait + 2*retry_timeout <= ttl)"
            )
        return self


class Balancer(_Strict):
    check_interval_ms: int = 1000
    fall: int = 2
    rise: int = 1

    @field_validator("check_interval_ms")
    @classmethod
    def _inter(cls, v: int) -> int:
        if not 100 <= v <= 60000:
            raise ValueError(f"{v} ms is out of range; use 100-60000 (1000 is the measured default)")
        return v

    @field_validator("fall", "rise")
    @classmethod
    def _count(cls, v: int) -> int:
        if not 1 <= v <= 10:
            raise ValueError(f"{v} is out of range; use 1-10")
        return v


class Broker(_Strict):
    # A task's message stays unacknowledged while the task runs (acks_late): RabbitMQ closes a
    # consumer that holds one longer than this. It must outlast the longest task.
    consumer_timeout_s: int = 8 * 3600

    @field_validator("consumer_timeout_s")
    @classmethod
    def _timeout(cls, v: int) -> int:
        if v < 60:
            raise ValueError(f"{v} s is too short; use at least 60 (it must outlast the longest task)")
        return v


AIRFLOW_RE = re.compile(r"^3\.3\.\d+$")


class Airflow(_Strict):
    version: str = "3.3.2"
    dags: str | None = None  # a DAG folder (relative to the spec); None: the shipped examples
    worker_concurrency: int = 3
    api_workers: int = 1  # uvicorn workers per api-server (~290 MiB each)
    parallelism: int = 32
    task_execution_timeout_s: int = 6 * 3600  # the longest a task may run (Airflow kills it after)
    task_retries: int = 2
    task_retry_delay_s: int = 10
    task_queued_timeout_s: int = 120
    task_heartbeat_timeout_s: int = 60  # a running task whose worker died is failed (and retried) after this
    dag_processor_lease_ttl_s: int = 10

    @field_validator("version")
    @classmethod
    def _version(cls, v: Any) -> str:
        v = str(v)
        if not AIRFLOW_RE.match(v):
            raise ValueError(f"Airflow {v!r} is not supported; use a 3.3.x release such as 3.3.2")
        return v

    @field_validator("worker_concurrency", "api_workers", "parallelism")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"{v} must be at least 1")
        return v

    @field_validator("task_heartbeat_timeout_s")
    @classmethod
    def _heartbeat(cls, v: int) -> int:
        # Must outlast a database failover (about 20 s), when no heartbeat can be written.
        if v < 45:
            raise ValueError(f"{v} s is too short; use at least 45 (running tasks stop heartbeating during a database failover)")
        return v

    @field_validator("dag_processor_lease_ttl_s")
    @classmethod
    def _ttl(cls, v: int) -> int:
        if not 5 <= v <= 120:
            raise ValueError(f"{v} s is out of range; use 5-120 (a dead node's dag-processor is replaced after about this)")
        return v

    @field_validator("task_execution_timeout_s")
    @classmethod
    def _exec(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"{v} s is not a duration; use a positive number of seconds")
        return v


class Spec(_Strict):
    cluster: str
    nodes: list[Node]
    ports: Ports = Field(default_factory=Ports)
    etcd: Etcd = Field(default_factory=Etcd)
    database: Database = Field(default_factory=Database)
    balancer: Balancer = Field(default_factory=Balancer)
    broker: Broker = Field(default_factory=Broker)
    airflow: Airflow = Field(default_factory=Airflow)

    @field_validator("cluster")
    @classmethod
    def _cluster(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"{v!r} is not a valid cluster name; use lowercase letters, digits and '-', starting with a letter")
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
        names = self.etcd.members if self.etcd.members is not None else [n.name for n in self.nodes]
        return [n for n in self.nodes if n.name in names]


def cross_field_problems(data: dict[str, Any]) -> list[str]:
    """Problems that involve several fields; each line starts with the field path.

    Works on the raw document so they are reported together with per-field errors."""
    nodes = [n for n in data.get("nodes") or [] if isinstance(n, dict)] if isinstance(data.get("nodes"), list) else []
    etcd = data.get("etcd") if isinstance(data.get("etcd"), dict) else {}
    ports = {**Ports().model_dump(), **(data.get("ports") if isinstance(data.get("ports"), dict) else {})}
    problems: list[str] = []
    if "nodes" in data and len(nodes) < 3:
        problems.append(f"nodes: {len(nodes)} node(s) given; an HA cluster needs at least 3 (add nodes)")
    problems += _duplicates(nodes, "name")
    problems += _duplicates(nodes, "address")
    names = [str(n.get("name")) for n in nodes]
    explicit = etcd.get("members")
    members = [str(m) for m in explicit] if isinstance(explicit, list) else names
    for i, m in enumerate(members if isinstance(explicit, list) and names else []):
        if m not in names:
            problems.append(f"etcd.members[{i}]: {m!r} is not a node of this spec; use one of {', '.join(names)}")
    if len(set(members)) != len(members):
        problems.append("etcd.members: a node is listed twice; list each member once")
    if members and len(set(members)) % 2 == 0:
        where = "etcd.members" if isinstance(explicit, list) else "nodes"
        problems.append(
            f"{where}: {len(set(members))} etcd members is an even number; a quorum needs an odd count "
            "(3 or 5): set etcd.members to an odd subset of the nodes"
        )
    problems += _port_clashes(ports)
    problems += _timeout_problems(data)
    return problems


def _timeout_problems(data: dict[str, Any]) -> list[str]:
    broker = data.get("broker") if isinstance(data.get("broker"), dict) else {}
    airflow = data.get("airflow") if isinstance(data.get("airflow"), dict) else {}
    consumer = broker.get("consumer_timeout_s", Broker().consumer_timeout_s)
    task = airflow.get("task_execution_timeout_s", Airflow().task_execution_timeout_s)
    if isinstance(consumer, int) and isinstance(task, int) and consumer <= task:
        return [f"broker.consumer_timeout_s: {consumer} s does not outlast airflow.task_execution_timeout_s ({task} s); "
                "RabbitMQ would close the channel of a worker running a long task: set it above the task timeout"]
    return []


def _duplicates(nodes: list[dict[str, Any]], attr: str) -> list[str]:
    seen: dict[Any, int] = {}
    out = []
    for i, n in enumerate(nodes):
        v = n.get(attr)
        if v is None:
            continue
        if v in seen:
            out.append(f"nodes[{i}].{attr}: {v!r} is already used by nodes[{seen[v]}]; every node needs its own {attr}")
        else:
            seen[v] = i
    return out


def _port_clashes(ports: dict[str, Any]) -> list[str]:
    """Two services of one node on the same address and port can never both start."""
    by_port: dict[Any, list[str]] = defaultdict(list)
    for field, port in ports.items():
        by_port[port].append(field)
    return [
        f"ports.{fields[1]}: port {port} is also used by ports.{fields[0]} on the same address; give each service its own port"
        for port, fields in by_port.items()
        if len(fields) > 1
    ]


def _field_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if path else "") + str(part)
    return path or "spec"


def _friendly(err: dict[str, Any], model_fields: dict[str, list[str]]) -> str:
    loc = err["loc"]
    path = _field_path(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = _field_path(loc[:-1])
        known = model_fields.get(_strip_indexes(parent), [])
        hint = f"; known keys here: {', '.join(known)}" if known else ""
        return f"{path}: unknown key{hint}"
    if kind == "missing":
        return f"{path}: required field is missing; add it"
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


def parse_spec(data: Any, source: str = "spec") -> Spec:
    """Validate a parsed YAML document; raise SpecError listing every problem."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: the spec must be a YAML mapping (cluster:, nodes:, ...)")
    lines: list[str] = []
    spec: Spec | None = None
    try:
        spec = Spec.model_validate(data)
    except ValidationError as e:
        known = _known_keys()
        lines = [_friendly(err, known) for err in e.errors()]
    lines += [p for p in cross_field_problems(data) if p not in lines]
    if lines or spec is None:
        raise SpecError(f"{source}: {len(lines)} problem(s) in the spec", details=lines)
    return spec


def default_spec_text() -> str:
    return resources.files("haflow").joinpath("data", DEFAULT_SPEC_NAME).read_text()


def load_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"{source}:{where}: not valid YAML ({problem}); fix the syntax") from None


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
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(f"{path}: spec file not found; create one with `haflow init {path}`") from None
    except OSError as e:
        raise SpecError(f"{path}: cannot read the spec ({e.strerror})") from None
    return parse_spec(load_yaml(text, str(path)), str(path))
