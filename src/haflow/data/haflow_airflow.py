"""Airflow settings that need Python, installed by haflow on every node (on PYTHONPATH).

- hostname(): each node's name (every local node shares the machine's hostname, and jobs, task
  instances and logs must say which node they ran on);
- CELERY_CONFIG: quorum queues with publisher confirms, and the broker fixes of the field notes;
- a fix for Airflow's subprocess supervisor sleeping out its whole timeout after its child exited
  (every Airflow process reads this module for its hostname, so the fix is in place in each);
- a Celery worker declares its control ("pidbox") queue again when a broker node's death took
  it away, so it keeps answering pings;
- IdleAutoscaler: a worker's pool shrinks only after 30 s without demand.
"""

import os

from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG


def hostname() -> str:
    return os.environ.get("HAFLOW_NODE") or os.uname().nodename


# Airflow's database connections go through PgBouncer in transaction mode, which (1.18) cannot
# route server-side prepared statements: psycopg must never prepare one (it does after 5 runs of
# the same query by default). [database] sql_alchemy_connect_args(_async) name this dict.
POOLED_CONNECT_ARGS = {"prepare_threshold": None}

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
    # with `--autoscale` (airflow.worker_idle_processes): see IdleAutoscaler below
    "worker_autoscaler": "haflow_airflow:IdleAutoscaler",
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


# A Celery worker answers pings and control commands through its own "pidbox" queue, a transient
# classic queue on the RabbitMQ node it is connected to. When that node dies, the worker
# reconnects through its balancer within milliseconds and declares the queue again; if the
# surviving nodes have not yet cleaned up the dead node's transient queues, the declaration finds
# the old queue, and the clean-up that follows deletes it under the worker. The worker then runs
# tasks but never answers again (seen in a CI run and on this machine: RabbitMQ 3.10, "transient
# queues from an old incarnation of node ... deleted" right after the worker's reconnect; on real
# networks the clean-up waits for net_ticktime, so the window is tens of seconds). So the worker
# checks every few seconds that its queue exists and declares it again when it does not.
from amqp.exceptions import NotFound as _NotFound  # noqa: E402
from celery.utils.log import get_logger as _get_logger  # noqa: E402
from celery.worker import pidbox as _pidbox  # noqa: E402

PIDBOX_CHECK_S = 5.0
_pidbox_log = _get_logger("haflow.pidbox")
_pidbox_start = _pidbox.Pidbox.start


def _pidbox_queue_missing(box) -> bool:
    channel = box.c.connection.channel()
    try:
        channel.queue_declare(queue=box.node.mailbox.get_queue(box.node.hostname).name, passive=True)
        return False
    except _NotFound:
        return True  # the 404 closed the channel
    finally:
        if channel.is_open:
            channel.close()


def _check_pidbox(box) -> None:
    connection = box.c.connection
    if connection is None or not connection.connected:
        return  # reconnecting: Celery starts the box again, and this check with it
    if box.consumer is None and not box._haflow_start_failed:
        return  # stopped by Celery
    try:
        if box._haflow_start_failed or _pidbox_queue_missing(box):
            _pidbox_log.warning("the control queue of %s is not consumed; declaring it again", box.hostname)
            box.reset()
    except Exception as exc:
        # e.g. the broker refused the declaration while it still held the old queue's record: a
        # failed reset leaves no consumer, so the next check must try again (it used to give up)
        _pidbox_log.warning("declaring the control queue of %s again failed (%r); trying again in %.0f s",
                            box.hostname, exc, PIDBOX_CHECK_S)


def _start_and_watch(self, c):
    self._haflow_start_failed = True  # until the queue is declared and consumed (the running check retries)
    _pidbox_start(self, c)
    self._haflow_start_failed = False
    # on every (re)start: a lost connection clears the worker's timer, this check's included
    previous = getattr(self, "_haflow_watch", None)
    if previous is not None:
        previous.cancel()
    self._haflow_watch = c.timer.call_repeatedly(PIDBOX_CHECK_S, _check_pidbox, (self,))


_pidbox.Pidbox._haflow_start_failed = False
_pidbox.Pidbox.start = _start_and_watch


# Celery's autoscaler lets a grown pool shrink `keepalive` (30 s) after its last growth, busy or
# not: in a stream of short tasks it stopped a process at the first moment fewer tasks were
# waiting than processes ran, and forked a new one for the next task (the HA cluster's 100 no-op
# tasks went from 9.7 to 7 tasks/s from one run to the next: docs/benchmarks.md). This one
# shrinks only after `keepalive` seconds in which no task needed more than the idle processes.
from time import monotonic as _monotonic  # noqa: E402

from celery.worker.autoscale import Autoscaler as _Autoscaler  # noqa: E402


class IdleAutoscaler(_Autoscaler):
    def _maybe_scale(self, req=None):
        if self.qty > self.min_concurrency:
            self._last_scale_up = _monotonic()  # what Autoscaler.scale_down measures from
        return super()._maybe_scale(req)
