import shutil

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
    venv = default_venvs_dir() / f"airflow-{version}"
    ensure_venv(venv, airflow.requirements(version), lambda _: None)
    return venv


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; .ci/run installs it (apt-get install haproxy etcd-server)")
    return path
