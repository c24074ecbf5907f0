import shutil
import time
from pathlib import Path

import pytest

from haflow.components import airflow, patroni
from haflow.hosts.local import default_venvs_dir
from haflow.hosts.local_provision import ensure_venv
from haflow.spec import embedded_default


@pytest.fixture(scope="session")
def patroni_venv():
    """The real Patroni runtime venv (built once, reused like `haflow up` reuses it)."""
    version = "4.1.5"
    venv = patroni.venv_dir_for(default_venvs_dir(), version)
    ensure_venv(venv, [patroni.requirement(version)], lambda _: None)
    return venv


@pytest.fixture(scope="session")
def airflow_venv():
    """The real Airflow runtime venv of the default spec (built once, reused like `haflow up`)."""
    version = embedded_default().airflow.version
    venv = airflow.venv_dir_for(default_venvs_dir(), version)
    ensure_venv(venv, airflow.requirements(version), lambda _: None)
    return venv


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; .ci/run installs it (apt-get install haproxy etcd-server)")
    return path


def keep_logs_of_failure(state_dir: Path, lines: int = 25) -> str:
    """What a failed command leaves for whoever reads the test output: the last lines of every
    node's logs (a CI machine is gone afterwards), and a copy of all of them under /var/tmp."""
    logs = sorted(state_dir.glob("nodes/*/logs/*.log"))
    if not logs:
        return ""
    keep = Path("/var/tmp") / f"haflow-failed-logs-{time.strftime('%Y%m%dT%H%M%S')}"
    out = [f"logs copied to {keep}"]
    for log in logs:
        dest = keep / log.parent.parent.name / log.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log, dest)
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        out += [f"--- {log.parent.parent.name}/{log.name}", *(line[:300] for line in tail)]
    return "\n".join(out)
