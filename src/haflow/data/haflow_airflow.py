"""Airflow settings that need Python, installed by haflow on every node (on PYTHONPATH).

- hostname(): each node's name (every local node shares the machine's hostname, and jobs, task
  instances and logs must say which node they ran on);
- CELERY_CONFIG: quorum queues with publisher confirms, and the broker fixes of the field notes.
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
