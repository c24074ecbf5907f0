"""The one place that computes the cluster's facts: addresses, ports, URLs, names.

Components and status read everything they need about *where* things are from here, so two
components can never disagree about, say, the etcd endpoints or the balancer ports. Paths on
a node (data, config, sockets) are not facts of the cluster but of the host: see `NodeLayout`,
which each host kind builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from haflow.spec import Node, Spec


def hostport(address: str, port: int) -> str:
    return f"{address}:{port}"


@dataclass(frozen=True)
class NodeFacts:
    name: str
    address: str
    is_etcd_member: bool
    roles: frozenset[str]  # spec.ROLES it runs; a balancer runs on every node
    etcd_client_url: str
    etcd_peer_url: str
    patroni_api_url: str
    postgres: str  # HOST:PORT of this node's PostgreSQL
    pg_primary: str  # HOST:PORT of this node's balancer, read-write
    pg_replicas: str  # HOST:PORT of this node's balancer, read-only
    haproxy_stats_url: str
    amqp: str  # HOST:PORT of this node's RabbitMQ
    amqp_balancer: str  # HOST:PORT of this node's balancer in front of every RabbitMQ node
    rabbitmq_management_url: str
    airflow_api: str  # HOST:PORT of this node's api-server
    api_balancer: str  # HOST:PORT of this node's balancer in front of every api-server
    pooler: str  # HOST:PORT of this node's PgBouncer, in front of its balancer's read-write port


@dataclass(frozen=True)
class NodeLayout:
    """Where one node's files live and as whom each service runs; built by the host."""

    root: Path  # haflow's own files of this node (supervisor config, logs): private to haflow
    services: Path  # each service's config and data, in a folder its own user owns (see hosts)
    db_root: Path  # what the database user reads and writes: Patroni config, PGDATA (see hosts)
    run: Path  # sockets and pid files (short path: unix sockets are limited to 107 bytes)
    logs: Path
    venvs: Path  # runtime virtualenvs, shared by the nodes of a host
    db_user: str  # PostgreSQL/Patroni run as this user
    task_logs: Path  # Airflow's task log folder
    serve_task_logs: bool  # False when every node shares task_logs (one machine): no log servers
    users: tuple[tuple[str, str], ...] = ()  # (component, system user) for services not run as haflow's user
    postgres_version: int = 15  # the PostgreSQL major version on this host (the spec's, or its release's own)

    def user(self, component: str) -> str | None:
        """The system user a component's service runs as; None: the user haflow runs as."""
        return dict(self.users).get(component)

    @property
    def etcd_data(self) -> Path:
        return self.services / "etcd"

    @property
    def pg_home(self) -> Path:
        return self.db_root

    @property
    def pg_data(self) -> Path:
        return self.pg_home / "data"

    @property
    def pg_socket_dir(self) -> Path:
        return self.run / "pg"

    @property
    def haproxy_run(self) -> Path:
        return self.run / "haproxy"

    @property
    def haproxy_socket(self) -> Path:
        return self.haproxy_run / "haproxy.sock"


@dataclass(frozen=True)
class EtcdJoin:
    """How a member's first boot meets the cluster: etcd's initial-cluster and -state. A member
    reads them only while its data dir is empty, but they are kept as they were so its file
    never changes (a changed file would restart it)."""
    initial_cluster: str
    state: str  # "new": it founded the cluster; "existing": it was added to a running one


class ClusterFacts:
    def __init__(self, spec: Spec, etcd_joins: dict[str, EtcdJoin] | None = None) -> None:
        self.spec = spec
        # from the state record (StateDir.etcd_joins); without one every member is a founder
        self._etcd_joins = etcd_joins or {}

    @property
    def name(self) -> str:
        return self.spec.cluster

    @cached_property
    def nodes(self) -> list[NodeFacts]:
        members = {n.name for n in self.spec.etcd_members}
        return [self._node_facts(n, n.name in members) for n in self.spec.nodes]

    def _node_facts(self, n: Node, member: bool) -> NodeFacts:
        p = self.spec.ports
        return NodeFacts(
            name=n.name,
            address=n.address,
            is_etcd_member=member,
            roles=frozenset(n.roles),
            etcd_client_url=f"http://{hostport(n.address, p.etcd_client)}",
            etcd_peer_url=f"http://{hostport(n.address, p.etcd_peer)}",
            patroni_api_url=f"http://{hostport(n.address, p.patroni_api)}",
            postgres=hostport(n.address, p.postgres),
            pg_primary=hostport(n.address, p.pg_primary),
            pg_replicas=hostport(n.address, p.pg_replicas),
            haproxy_stats_url=f"http://{hostport(n.address, p.haproxy_stats)}/",
            amqp=hostport(n.address, p.rabbitmq_amqp),
            amqp_balancer=hostport(n.address, p.amqp_balancer),
            rabbitmq_management_url=f"http://{hostport(n.address, p.rabbitmq_management)}",
            airflow_api=hostport(n.address, p.airflow_api),
            api_balancer=hostport(n.address, p.api_balancer),
            pooler=hostport(n.address, p.pooler),
        )

    # which role binds which port (the balancer's ports are bound on every node)
    ROLE_PORTS = {"database": ("patroni_api", "postgres"),
                  "broker": ("rabbitmq_amqp", "rabbitmq_management", "rabbitmq_dist"),
                  "airflow": ("airflow_api", "trigger_log_server"), "worker": ("worker_log_server",)}

    def listen_ports(self, node: str) -> dict[int, str]:
        """Every TCP port a node's services bind on its address, with the spec field naming it."""
        n = self.node(node)
        ports = self.spec.ports.model_dump()
        ports.pop("epmd")  # one epmd per machine, not per node: see host_listen_ports
        ports["rabbitmq_dist"] = self.rabbit_dist_port(node)
        if not n.is_etcd_member:
            ports = {k: v for k, v in ports.items() if not k.startswith("etcd_")}
        for role, fields in self.ROLE_PORTS.items():
            if role not in n.roles:
                ports = {k: v for k, v in ports.items() if k not in fields}
        return {port: f"ports.{field}" for field, port in ports.items()}

    def host_listen_ports(self) -> dict[tuple[str, int], str]:
        """Ports of the machine-wide services: epmd, on every node address and on 127.0.0.1,
        which epmd always binds as well (so two clusters on one machine need two epmd ports)."""
        ports = {(n.address, self.spec.ports.epmd): "ports.epmd" for n in self.broker_nodes}
        ports[("127.0.0.1", self.spec.ports.epmd)] = "ports.epmd"
        return ports

    def node(self, name: str) -> NodeFacts:
        self.spec.node(name)  # raises a UserError naming the known nodes
        return next(n for n in self.nodes if n.name == name)

    @property
    def node_names(self) -> list[str]:
        return [n.name for n in self.nodes]

    def with_role(self, role: str) -> list[NodeFacts]:
        return [n for n in self.nodes if role in n.roles]

    def names_with_role(self, role: str) -> list[str]:
        return [n.name for n in self.with_role(role)]

    @property
    def database_nodes(self) -> list[NodeFacts]:
        """Patroni + PostgreSQL members."""
        return self.with_role("database")

    @property
    def broker_nodes(self) -> list[NodeFacts]:
        """RabbitMQ cluster members."""
        return self.with_role("broker")

    @property
    def airflow_nodes(self) -> list[NodeFacts]:
        """Airflow's control plane: api-server, scheduler, triggerer, dag-processor candidate."""
        return self.with_role("airflow")

    @property
    def worker_nodes(self) -> list[NodeFacts]:
        """Celery workers."""
        return self.with_role("worker")

    # --- etcd -------------------------------------------------------------------------------
    @property
    def etcd_members(self) -> list[NodeFacts]:
        return [n for n in self.nodes if n.is_etcd_member]

    def etcd_join(self, node: str) -> EtcdJoin:
        return self._etcd_joins.get(node) or EtcdJoin(
            ",".join(f"{n.name}={n.etcd_peer_url}" for n in self.etcd_members), "new")

    @property
    def etcd_hosts(self) -> list[str]:
        return [hostport(n.address, self.spec.ports.etcd_client) for n in self.etcd_members]

    @property
    def etcd_token(self) -> str:
        return f"haflow-{self.name}"

    # --- database ---------------------------------------------------------------------------
    @property
    def patroni_namespace(self) -> str:
        return "/haflow/"

    @property
    def patroni_scope(self) -> str:
        return self.name

    @property
    def pg_client_networks(self) -> list[str]:
        """Source addresses PostgreSQL accepts: the nodes, plus 127.0.0.1 when nodes are on
        loopback (the kernel sends loopback traffic between 127.0.0.x aliases from 127.0.0.1)."""
        nets = [f"{n.address}/32" for n in self.nodes]
        if any(n.address.startswith("127.") for n in self.nodes) and "127.0.0.1/32" not in nets:
            nets.append("127.0.0.1/32")
        return nets

    @property
    def pg_primary_endpoints(self) -> list[str]:
        return [n.pg_primary for n in self.nodes]

    @property
    def pg_replica_endpoints(self) -> list[str]:
        return [n.pg_replicas for n in self.nodes]

    @property
    def airflow_db(self) -> str:
        return "airflow"

    # --- broker -----------------------------------------------------------------------------
    def rabbit_node_name(self, node: str) -> str:
        """Long Erlang node name with the node's address: per-node addresses on one machine need
        it, and one epmd serves several nodes only if their name parts differ."""
        return f"rabbit-{node}@{self.node(node).address}"

    def node_of_rabbit(self, erlang_name: str | None) -> str | None:
        return next((n.name for n in self.nodes if self.rabbit_node_name(n.name) == erlang_name), None)

    def rabbit_dist_port(self, node: str) -> int:
        """ports.rabbitmq_dist + the node's index: RabbitMQ refuses a distribution port that
        another node registered with the same epmd, whatever its address."""
        return self.spec.ports.rabbitmq_dist + self.node_names.index(node)

    def rabbit_peers_in_order(self, node: str) -> list[NodeFacts]:
        """The RabbitMQ nodes a node's balancer tries, its own first, then the next ones round
        the ring, so clients spread over the broker instead of piling onto one node (P-A5); a
        node without a broker starts at its own place in the ring too."""
        brokers = self.broker_nodes
        names = [b.name for b in brokers]
        i = names.index(node) if node in names else self.node_names.index(node) % len(brokers)
        return brokers[i:] + brokers[:i]

    @property
    def amqp_endpoints(self) -> list[str]:
        return [n.amqp_balancer for n in self.nodes]

    # --- airflow ----------------------------------------------------------------------------
    @property
    def api_urls(self) -> list[str]:
        """The Airflow UI/API through each node's balancer (every node has one)."""
        return [f"http://{n.api_balancer}/" for n in self.nodes]

    def worker_log_port(self, node: str) -> int:
        return self.spec.ports.worker_log_server

    def trigger_log_port(self, node: str) -> int:
        return self.spec.ports.trigger_log_server
