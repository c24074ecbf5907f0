"""Airflow settings that need Python, installed by haflow on every node (on PYTHONPATH).

- hostname(): each node's name (every local node shares the machine's hostname, and jobs, task
  instances and logs must say which node they ran on);
- CELERY_CONFIG: quorum queues with publisher confirms, and the broker fixes of the field notes;
- a fix for Airflow's subprocess supervisor sleeping out its whole timeout after its child exited
  (every Airflow process reads this module for its hostname, so the fix is in place in each).
"""

import os

from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG


def hostname() -> str:
    return os.environ.get("HAFLOW_NODE") or os.uname().nodename


CELERY_CONFIG = {
    **DEFAULT_CELERY_CONFIG,
    # Every queue Celery declares (the default one and any named with -q) is a quorum queue.
    "task_default_queue_type": "quorum",
    "task_create_missing_queue_type": "quorum",
    "broker_transport_options": {**DEFAULT_CELERY_CONFIG.get("broker_transport_options", {}), "confirm_publish": True},
    "broker_heartbeat": 10,
    "broker_connection_retry_on_startup": True,
    # After a reconnect Celery lowers the prefetch count and, with quorum queues (no global
    # QoS), it came back only slowly: tasks ran one at a time (P-A3).
    "worker_enable_prefetch_count_reduction": False,
}

# Celery >= 5.5 turns on "native delayed delivery" when it detects quorum queues: 28 extra quorum
# queues, declared on every (re)connect with retries that stalled workers 17 s after a broker
# node died (P-A2). Airflow never sends ETA/countdown tasks, so the bootstep is skipped.
from celery.worker.consumer import delayed_delivery as _delayed_delivery  # noqa: E402

_delayed_delivery.DelayedDelivery.include_if = lambda self, c: False


# Airflow's supervisor waits for a child (the triggerer's trigger runner, a task) in select() on
# the child's sockets, then checks whether it exited. Once every socket has closed the selector is
# empty and select() sleeps the whole timeout: the triggerer's stop waited its full 10 s
# escalation delay for a runner that had exited at once. With no socket left, wait on the process
# itself, which returns as soon as it exits.
import time as _time  # noqa: E402

from airflow.sdk.execution_time import supervisor as _supervisor  # noqa: E402

_EXIT_POLL_S = 0.05
_select_then_check = _supervisor.WatchedSubprocess._service_subprocess


def _service_subprocess(self, max_wait_time, raise_on_timeout=False, expect_signal=None):
    if self.selector.get_map() or raise_on_timeout:
        return _select_then_check(self, max_wait_time, raise_on_timeout, expect_signal)
    deadline = _time.monotonic() + max(0.01, max_wait_time)
    while (code := self._check_subprocess_exit(expect_signal=expect_signal)) is None and _time.monotonic() < deadline:
        _time.sleep(_EXIT_POLL_S)
    return code


_supervisor.WatchedSubprocess._service_subprocess = _service_subprocess
