"""Where a cluster runs, behind one contract (hosts/base.py); `for_spec` picks the host."""

from __future__ import annotations

from pathlib import Path

from haflow.hosts.base import Host
from haflow.spec import Spec


def for_spec(spec: Spec, state_dir: Path) -> Host:
    """Every spec today runs its nodes on this machine (a supervisord per node)."""
    from haflow.hosts.local import LocalHost

    return LocalHost(state_dir, spec.cluster, tuple(n.name for n in spec.nodes))
