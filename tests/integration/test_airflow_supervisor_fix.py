"""data/haflow_airflow.py's fix to Airflow's subprocess supervisor, on the real Airflow of the
default spec: once a child's sockets have all closed (the trigger runner's, when a triggerer
stops), Airflow's kill() slept its whole escalation delay in select() before it noticed the
child had exited; a triggerer's stop took 10 s for that alone."""

import json
import subprocess

import pytest

from haflow.components import airflow
from haflow.components.base import data_text

pytestmark = pytest.mark.integration

ESCALATION_DELAY_S = 6.0

PROBE = """
import json, signal, socket, subprocess, sys, time, uuid
import psutil, structlog
if sys.argv[1] == "fixed":
    import haflow_airflow  # noqa: F401  (installs the fix, as every Airflow process of a node does)
from airflow.sdk.execution_time.supervisor import PsutilTracker, WatchedSubprocess

# A child with no socket left open to its supervisor; SIGINT ends it at once (also when this
# test runs under a shell that started it in the background, which ignores SIGINT: the child
# would inherit that)
signal.signal(signal.SIGINT, signal.SIG_DFL)
child = subprocess.Popen(["sleep", "120"])
stdin, _ = socket.socketpair()
watched = WatchedSubprocess(id=uuid.uuid4(), pid=child.pid, stdin=stdin, process_log=structlog.get_logger(),
                            process=PsutilTracker(psutil.Process(child.pid)))
start = time.monotonic()
watched.kill(signal.SIGINT, escalation_delay=float(sys.argv[2]))
print(json.dumps({"waited_s": time.monotonic() - start, "exit_code": watched._exit_code}))
"""


def kill_wait(venv, module_dir, mode: str) -> dict:
    r = subprocess.run([str(venv / "bin/python"), "-c", PROBE, mode, str(ESCALATION_DELAY_S)],
                       env={"PYTHONPATH": str(module_dir), "PATH": "/usr/bin:/bin"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_supervisor_sees_a_child_exit_at_once_when_its_sockets_are_closed(airflow_venv, tmp_path):
    (tmp_path / f"{airflow.CONFIG_MODULE}.py").write_text(data_text(f"{airflow.CONFIG_MODULE}.py"))
    plain, fixed = kill_wait(airflow_venv, tmp_path, "plain"), kill_wait(airflow_venv, tmp_path, "fixed")
    assert plain["exit_code"] == fixed["exit_code"] == -2  # SIGINT, the same outcome either way
    # Airflow alone waits out the escalation delay (the bug this fix exists for)...
    assert plain["waited_s"] >= ESCALATION_DELAY_S
    # ...haflow's nodes see the exit in well under half of it.
    assert fixed["waited_s"] < ESCALATION_DELAY_S / 2, fixed
