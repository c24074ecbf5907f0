"""Least privilege, rendered: own users for every service, files only their owner reads, tasks
without the cluster's keys, passwords sent as verifiers, one etcd user per service."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shlex
from pathlib import Path

import pytest
import yaml

from haflow.applied import APPLIED_FILE
from haflow.cluster import Cluster
from haflow.components import airflow, etcd, postgres
from haflow.hosts.local import LocalHost
from haflow.spec import default_spec_text, parse_spec

ADDRESSES = ["127.0.0.91", "127.0.0.92", "127.0.0.93"]
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="service users are used only when haflow runs as root")


def cluster(tmp_path: Path, **airflow_overrides) -> Cluster:
    data = yaml.safe_load(default_spec_text())
    for node, addr in zip(data["nodes"], ADDRESSES):
        node["address"] = addr
    data["airflow"].update(airflow_overrides)
    c = Cluster(parse_spec(data), tmp_path / "state")
    c.ensure_secrets()
    return c


def services(c: Cluster, node: str = "node1") -> dict:
    return {s.name: s for s in c.desired(node).services}


# --- own users, own folders ---------------------------------------------------------------------


@as_root
def test_every_service_runs_as_its_own_user_from_its_own_folder(tmp_path):
    c = cluster(tmp_path)
    users = {name: s.user for name, s in services(c).items()}
    assert users == {"etcd": "etcd", "patroni": "postgres", "haproxy": "haproxy", "pgbouncer": "pgbouncer",
                     "rabbitmq": "rabbitmq", "rabbitmq-guard": "rabbitmq",
                     **{name: "airflow" for name in airflow.SERVICES}, airflow.WORKER: "airflow-worker"}
    layout = c.host.layout("node1")
    assert not str(layout.services).startswith(str(c.state_dir))  # service users cannot reach a 0700 state dir
    desired = c.desired("node1")
    secrets = [a["password"] for a in c.secrets.as_dict().values()] + list(c.secrets.keys_dict().values())
    for f in desired.files:
        if f.mode & 0o077 == 0:
            assert f.owner is not None, f.path  # private files belong to the service's user, not root
        else:  # readable by others: code and harmless config only
            assert not any(secret in f.content for secret in secrets), f.path
    for d in desired.dirs:
        if d.path.is_relative_to(layout.services):
            # private, or shared with Airflow's group; never writable by others
            assert d.owner is not None and d.mode & 0o007 in (0, 0o005) and not d.mode & 0o002, d.path


def test_a_cluster_created_by_an_older_haflow_keeps_its_files_where_they_are(tmp_path):
    """Its etcd data lives in the state directory: moving or re-homing it would start an empty
    etcd next to an existing database. Its services keep running as haflow's own user."""
    state = tmp_path / "state"
    (state / "nodes/node1/etcd/member").mkdir(parents=True)
    host = LocalHost(state, "haflow")
    layout = host.layout("node1")
    assert layout.services == layout.root and layout.etcd_data == state / "nodes/node1/etcd"
    assert layout.user("etcd") is None and layout.user("airflow") is None
    assert host.services_run_as_root() == (os.geteuid() == 0)


# --- what tasks inherit -------------------------------------------------------------------------


def test_workers_and_their_tasks_get_neither_the_keys_nor_an_admin_password(tmp_path):
    c = cluster(tmp_path)
    svc = services(c)
    worker = svc[airflow.WORKER].env
    for key in airflow.WORKER_WITHHELD:
        assert key not in worker
        assert key in svc[airflow.SCHEDULER].env  # the scheduler and api-server do need them
    assert worker["AIRFLOW_HOME"] != svc[airflow.SCHEDULER].env["AIRFLOW_HOME"]  # its own home
    values = "\n".join(worker.values())
    s = c.secrets
    for name in ("postgres_superuser", "rabbitmq_admin", "etcd_root", "etcd_patroni", "etcd_elector", "airflow_admin"):
        assert s[name].password not in values, name
    assert s.key("airflow_fernet_key") not in values
    assert s["postgres_airflow"].password in values  # Celery's result backend: the airflow role only


def test_the_electors_etcd_password_is_in_its_environment_only(tmp_path):
    c = cluster(tmp_path)
    elector = services(c)[airflow.DAG_PROCESSOR]
    password = c.secrets["etcd_elector"].password
    assert password not in shlex.join(elector.argv)  # argv is world-readable in ps
    assert elector.env[airflow.ELECTOR_PASSWORD_ENV] == password
    assert airflow.ELECTOR_PASSWORD_ENV not in services(c)[airflow.SCHEDULER].env
    source = (Path(airflow.__file__).parent.parent / "data" / airflow.ELECTOR).read_text()
    assert "os.environ.pop(PASSWORD_ENV" in source  # and the dag-processor it starts does not inherit it


# --- auth manager -------------------------------------------------------------------------------


def test_fab_is_the_default_auth_manager_and_simple_only_when_asked(tmp_path):
    fab = cluster(tmp_path / "a")
    env = services(fab)[airflow.API].env
    assert env["AIRFLOW__CORE__AUTH_MANAGER"] == airflow.FAB_AUTH_MANAGER
    assert not any("SIMPLE_AUTH" in k for k in env)
    assert not any(f.path.name == "simple_auth_manager_passwords.json" for f in fab.desired("node1").files)
    simple = cluster(tmp_path / "b", auth_manager="simple")
    env = services(simple)[airflow.API].env
    assert env["AIRFLOW__CORE__AUTH_MANAGER"] == airflow.SIMPLE_AUTH_MANAGER
    assert "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE" in env


def test_the_fab_admin_password_never_reaches_a_command_line(tmp_path):
    c = cluster(tmp_path)
    argv, extra = airflow.admin_command(c.facts, c.host.layout("node1"), c.secrets)
    password = c.secrets["airflow_admin"].password
    assert password not in " ".join(argv) and extra == {"HAFLOW_ADMIN_PASSWORD": password}


# --- SCRAM verifier -----------------------------------------------------------------------------


def test_scram_verifier_matches_the_rfc_7677_example():
    """RFC 7677 section 3: user "user", password "pencil". The verifier's ServerKey must produce
    the server signature of the RFC's exchange, and its StoredKey must check the client's proof."""
    verifier = postgres.scram_verifier("pencil", base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ=="), 4096)
    head, keys = verifier.rsplit("$", 1)
    assert head == "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ=="
    stored, server = (base64.b64decode(k) for k in keys.split(":"))
    auth = ("n=user,r=rOprNGfwEbeRWgbNEkqO,"
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,"
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0").encode()
    assert base64.b64encode(hmac.new(server, auth, "sha256").digest()).decode() == "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    proof = base64.b64decode("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    client_key = bytes(a ^ b for a, b in zip(proof, hmac.new(stored, auth, "sha256").digest()))
    assert hashlib.sha256(client_key).digest() == stored
    wrong = postgres.scram_verifier("pencil2", base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ=="), 4096)
    assert wrong != verifier


def test_the_airflow_roles_password_is_sent_as_a_verifier_only():
    statement = postgres.role_statement("CREATE", "airflow", "s3cret-Password").as_string(None)
    assert "s3cret-Password" not in statement
    assert statement.startswith('CREATE ROLE "airflow" LOGIN PASSWORD \'SCRAM-SHA-256$4096:')
    # a fresh salt each time: equal passwords do not give equal verifiers
    assert statement != postgres.role_statement("CREATE", "airflow", "s3cret-Password").as_string(None)


# --- etcd users ---------------------------------------------------------------------------------


def test_each_etcd_service_user_reaches_only_its_own_keys(tmp_path):
    c = cluster(tmp_path)
    roles = etcd.service_roles(c.facts)
    role, key, end = roles["etcd_patroni"]
    assert (key, end) == (b"/haflow/haflow/", b"/haflow/haflow0")  # Patroni's namespace and scope, as a prefix
    role, key, end = roles["etcd_elector"]
    assert key == airflow.dag_processor_key(c.facts).encode() and end == b""  # one key, no prefix
    conf = yaml.safe_load(next(f for f in c.desired("node1").files if f.path.name == "patroni.yml").content)
    assert conf["etcd3"]["username"] == c.secrets["etcd_patroni"].username
    login = next(f for f in c.desired("node1").files if f.path.name == "etcd-callback-login.json")
    assert login.mode == 0o600 and json.loads(login.content)["name"] == "root"


# --- a config change survives a failed run ------------------------------------------------------


def test_a_config_written_by_a_failed_run_still_restarts_its_service_next_time(tmp_path):
    """`up` wrote a new patroni.yml, then failed before reloading Patroni: the next `up` sees no
    file change, but the record of what Patroni took says it is stale."""
    c = cluster(tmp_path)
    c.applied.expect("node1", c.desired("node1"))
    record = tmp_path / "state/nodes/node1" / APPLIED_FILE
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"patroni": "old-digest"}))
    assert c.applied.stale("node1", "patroni", []) is True
    c.applied.took("node1", "patroni")
    assert c.applied.stale("node1", "patroni", []) is False
    assert record.stat().st_mode & 0o777 == 0o600
    assert json.loads(record.read_text())["patroni"] != "old-digest"


def test_task_logs_written_by_an_older_cluster_open_to_the_workers_group(tmp_path):
    """Before the workers had their own user, Airflow made the log folders 0755: a worker of
    the `airflow` group could not write a new run's logs there (the example DAG failed)."""
    from haflow.components.base import Directory
    from haflow.hosts.local import _ensure_dir

    logs = tmp_path / "airflow-task-logs"
    run = logs / "dag_id=x" / "run_id=1"
    run.mkdir(parents=True)
    (run / "attempt=1.log").write_text("old")
    for p in (logs, logs / "dag_id=x", run):
        p.chmod(0o755)
    (run / "attempt=1.log").chmod(0o644)
    assert _ensure_dir(Directory(logs, 0o2770, group_tree=True))
    assert (logs / "dag_id=x").stat().st_mode & 0o2070 == 0o2070 and run.stat().st_mode & 0o2070 == 0o2070
    assert (run / "attempt=1.log").stat().st_mode & 0o060 == 0o060
    plain = tmp_path / "other"
    (plain / "sub").mkdir(parents=True)
    (plain / "sub").chmod(0o755)
    _ensure_dir(Directory(plain, 0o2770))
    assert (plain / "sub").stat().st_mode & 0o070 == 0o050  # only a group_tree opens what is inside


def test_a_recreated_cluster_on_the_same_addresses_does_not_inherit_the_old_etcd_token(tmp_path):
    """An etcd 3.4 without authentication never answers a request carrying a token it did not
    issue: a benchmark that purged and recreated its cluster in one process waited out every
    probe's timeout (cold up 169 s instead of 105 s)."""
    first = cluster(tmp_path / "a")
    etcd.use_root(first.facts, first.secrets)
    url = first.facts.etcd_members[0].etcd_client_url
    etcd._tokens[url] = "token-of-the-purged-cluster"
    etcd.use_root(first.facts, first.secrets)
    assert etcd._tokens[url] == "token-of-the-purged-cluster"  # same cluster: kept
    second = cluster(tmp_path / "b")
    etcd.use_root(second.facts, second.secrets)
    assert url not in etcd._tokens
