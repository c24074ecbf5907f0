"""data/haflow_airflow.py's autoscaler for Celery workers (airflow.worker_idle_processes), on the
real Celery of the default spec's Airflow. Celery's own autoscaler shrinks a grown pool
`keepalive` seconds after its last growth even while tasks keep coming, then forks again for the
next task: the HA cluster's throughput fell from one run of 100 tasks to the next."""

import json
import subprocess

import pytest

from haflow.components import airflow
from haflow.components.base import data_text

pytestmark = pytest.mark.integration

# A pool of 1..3 processes; the clock and the tasks waiting are the probe's to set.
PROBE = """
import json
from celery.worker import autoscale, state
import haflow_airflow

class Request:  # what the worker holds for a task it reserved (weakly referenced by the state)
    pass

class Pool:
    num_processes = 1
    def grow(self, n): self.num_processes += n
    def shrink(self, n): self.num_processes -= n
    def maintain_pool(self): pass

def run(cls):
    now = [0.0]
    autoscale.monotonic = haflow_airflow._monotonic = lambda: now[0]
    scaler = cls(Pool(), 3, 1, keepalive=30)
    seen, held = [], []
    # t=0: a run starts, 3 tasks waiting; t=40: still running, 2 waiting; t=60: 3 waiting;
    # t=95: the run ended 35 s ago
    for t, waiting in ((0, 3), (40, 2), (60, 3), (95, 0)):
        now[0] = 1000 + t  # Celery reads a last growth at 0 as none
        held[:] = [Request() for _ in range(waiting)]
        state.reserved_requests.clear()
        state.reserved_requests.update(held)
        scaler.maybe_scale()
        seen.append(scaler.processes)
    return seen

print(json.dumps({"celery": run(autoscale.Autoscaler), "haflow": run(haflow_airflow.IdleAutoscaler)}))
"""


def test_a_busy_pool_keeps_its_processes_and_shrinks_once_idle_for_keepalive(airflow_venv, tmp_path):
    (tmp_path / f"{airflow.CONFIG_MODULE}.py").write_text(data_text(f"{airflow.CONFIG_MODULE}.py"))
    r = subprocess.run([str(airflow_venv / "bin/python"), "-c", PROBE],
                       env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "AIRFLOW_HOME": str(tmp_path)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    # Celery's own: 40 s after growing it stops a process of a running stream, and forks it again
    assert seen["celery"] == [3, 2, 3, 1], seen
    # haflow's: the pool stays while tasks come, and shrinks 35 s after the last one
    assert seen["haflow"] == [3, 3, 3, 1], seen
