"""`haflow up` as root from a directory `postgres` cannot traverse (a clone under /root, say):
the database's files live under /var/lib/haflow/db, linked from the state directory, and
`down --purge --yes` removes both."""

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from haflow.cluster import Cluster
from haflow.hosts.local import DB_RELOCATION_BASE, is_root
from haflow.spec import default_spec_text, load_spec

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not is_root(), reason="needs root (PostgreSQL as postgres)")]
ADDRESSES = ["127.0.0.34", "127.0.0.35", "127.0.0.36"]
HAFLOW = [sys.executable, "-m", "haflow.cli"]


def test_up_and_purge_from_a_private_directory():
    root = Path(tempfile.mkdtemp(prefix="haflow-private-", dir="/var/tmp"))  # mode 0700
    spec_path = root / "cluster.yaml"
    data = yaml.safe_load(default_spec_text())
    data["cluster"] = "private"
    data["ports"]["epmd"] = 4373
    for node, addr in zip(data["nodes"], ADDRESSES):
        node["address"] = addr
    spec_path.write_text(yaml.safe_dump(data))
    cluster = Cluster(load_spec(spec_path), root / ".haflow")
    try:
        r = subprocess.run([*HAFLOW, "up", "-f", str(spec_path), "--json"], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["status"]["healthy"] is True
        link = root / ".haflow/nodes/node1/pg"
        assert link.is_symlink() and link.resolve().is_relative_to(DB_RELOCATION_BASE)
        real = link.resolve()
        assert (real / "data/PG_VERSION").exists()
        r = subprocess.run([*HAFLOW, "down", "-f", str(spec_path), "--purge", "--yes"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert not real.exists() and not (root / ".haflow").exists()
    finally:
        cluster.kill_all()
        cluster.host.purge()
        shutil.rmtree(root, ignore_errors=True)
