"""One module per component behind one contract (components/base.py), listed once here.

Orchestration renders and provisions every node from REGISTRY, in this order (the order the
layers start in); status and drills probe the same modules.
"""

from haflow.components import airflow, etcd, haproxy, patroni, pgbouncer, rabbitmq

REGISTRY = (etcd, patroni, haproxy, pgbouncer, rabbitmq, airflow)
