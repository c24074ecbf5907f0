import pytest

from haflow.hosts import local


@pytest.fixture(autouse=True)
def service_folders_in_tmp(tmp_path_factory, monkeypatch):
    """As root, a host puts service folders and databases under /var/lib/haflow: unit tests put
    them in a temporary folder instead, so they leave nothing behind."""
    base = tmp_path_factory.mktemp("var-lib-haflow")
    monkeypatch.setattr(local, "SERVICES_BASE", base / "clusters")
    monkeypatch.setattr(local, "DB_RELOCATION_BASE", base / "db")
