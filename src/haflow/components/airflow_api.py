"""The Airflow REST API through the nodes' balancers, as the generated admin: the client that
`up` (the example DAG), `dags trigger`, drills and benchmarks use."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from haflow.errors import ClusterUnhealthy
from haflow.facts import ClusterFacts
from haflow.secrets import Secrets

Say = Callable[[str], None]


def _token_request(http: httpx.Client, base: str, secrets: Secrets) -> httpx.Response:
    admin = secrets["airflow_admin"]
    return http.post(f"{base.rstrip('/')}/auth/token", json={"username": admin.username, "password": admin.password})


def login_works(base: str, secrets: Secrets, timeout: float = 10.0) -> bool | None:
    """Whether the generated admin gets an API token (None: no api-server answered)."""
    try:
        with httpx.Client(timeout=timeout) as http:
            r = _token_request(http, base, secrets)
    except httpx.HTTPError:
        return None
    return r.status_code in (200, 201) if r.status_code < 500 else None


BALANCER_HAS_NO_SERVER = (502, 503, 504)


class ApiClient:
    """The Airflow REST API through one balancer, as the generated admin."""

    def __init__(self, base: str, secrets: Secrets, timeout: float = 10.0) -> None:
        self.base = base.rstrip("/")
        self.http = httpx.Client(timeout=timeout)
        r = _token_request(self.http, self.base, secrets)
        r.raise_for_status()
        self.http.headers["Authorization"] = f"Bearer {r.json()['access_token']}"

    def get(self, path: str, attempts: int = 5) -> httpx.Response:
        """GET is idempotent: retried when an api-server dies under the request, or when the
        balancer answers for it that none is up right now (502-504, e.g. a busy machine failing
        a health check or two)."""
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                r = self.http.get(f"{self.base}/api/v2{path}")
            except httpx.TransportError:
                if last:
                    raise
            else:
                if r.status_code not in BALANCER_HAS_NO_SERVER or last:
                    return r
            time.sleep(1)
        raise AssertionError("unreachable")

    def post(self, path: str, body: dict[str, Any], attempts: int = 5) -> httpx.Response:
        """POST is retried only when the connection failed before the request was sent."""
        for attempt in range(attempts):
            try:
                return self.http.post(f"{self.base}/api/v2{path}", json=body)
            except httpx.ConnectError:
                if attempt == attempts - 1:
                    raise
                time.sleep(1)
        raise AssertionError("unreachable")

    def patch(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return self.http.patch(f"{self.base}/api/v2{path}", json=body)

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> str:
        r = self.post(f"/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf or {}})
        r.raise_for_status()
        return r.json()["dag_run_id"]

    def run_state(self, dag_id: str, run_id: str) -> str:
        r = self.get(f"/dags/{dag_id}/dagRuns/{run_id}")
        r.raise_for_status()
        return r.json()["state"]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        r = self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances?limit=1000")
        r.raise_for_status()
        return r.json()["task_instances"]


def connect(facts: ClusterFacts, secrets: Secrets) -> ApiClient:
    """A client through the first node's balancer that answers (ClusterUnhealthy if none)."""
    last: Exception | None = None
    for n in facts.nodes:
        try:
            return ApiClient(f"http://{n.api_balancer}", secrets)
        except httpx.HTTPError as e:
            last = e
    raise ClusterUnhealthy(f"no api-server answers through any balancer ({last}); run `haflow status`")


def run_dag(client: ApiClient, dag_id: str, timeout: float, say: Say = lambda _: None) -> dict[str, Any]:
    """Trigger a DAG run and wait for its end; returns its state and where its tasks ran."""
    deadline = time.monotonic() + timeout
    while client.get(f"/dags/{dag_id}").status_code == 404:  # not parsed yet
        if time.monotonic() > deadline:
            raise ClusterUnhealthy(f"DAG {dag_id} was not parsed within {timeout:.0f}s; check the dag-processor log")
        time.sleep(1)
    t0 = time.monotonic()
    run_id = client.trigger(dag_id)
    say(f"triggered {dag_id} ({run_id}), waiting for it to finish")
    state = "queued"
    while state not in ("success", "failed") and time.monotonic() < deadline:
        time.sleep(1)
        try:
            state = client.run_state(dag_id, run_id)
        except httpx.HTTPStatusError as e:  # a balancer without an api-server for a moment: ask again
            if e.response.status_code not in BALANCER_HAS_NO_SERVER:
                raise
    tis = client.task_instances(dag_id, run_id)
    return {
        "dag_id": dag_id,
        "run_id": run_id,
        "state": state,
        "duration_s": round(time.monotonic() - t0, 1),
        "tasks": len(tis),
        "nodes": sorted({ti.get("hostname") for ti in tis if ti.get("hostname")}),
    }
