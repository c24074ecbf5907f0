"""Where a cluster runs, behind one contract (hosts/base.py); `for_spec` picks the host."""

from __future__ import annotations

from pathlib import Path

from haflow.errors import UserError
from haflow.hosts.base import Host
from haflow.spec import Spec


def for_spec(spec: Spec, state_dir: Path) -> Host:
    """A spec without `ssh` runs its nodes on this machine (a supervisord per node)."""
    from haflow.hosts.local import LocalHost

    if any(n.ssh is not None for n in spec.nodes):
        raise UserError("this spec's nodes are reached over SSH (nodes[].ssh); this haflow runs clusters on this "
                        "machine only: remove `ssh` from the nodes to run them here")

    return LocalHost(state_dir, spec.cluster, tuple(n.name for n in spec.nodes))
