"""Where a cluster runs, behind one contract (hosts/base.py); `for_spec` picks the host."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from haflow.hosts.base import Host
from haflow.spec import Spec


def for_spec(spec: Spec, state_dir: Path, spec_dir: Path | None = None) -> Host:
    """A spec without `ssh` runs its nodes on this machine (a supervisord per node); with
    `ssh`, each node on its own server (systemd units, hosts/ssh.py)."""
    if any(n.ssh is not None for n in spec.nodes):
        from haflow.hosts.ssh import SshHost
        from haflow.hosts.ssh_transport import SshTarget
        from haflow.statedir import StateDir

        # servers of nodes that left the spec stay reachable (as the record says) to be stopped
        # and removed: `down`, `haflow node remove`
        rec = StateDir(state_dir).record()
        entries = rec.entries if rec else {}
        in_spec = {n.name for n in spec.nodes}
        former = [SshTarget(name, e["ssh"]["host"], e["ssh"]["user"], e["ssh"]["port"], e["ssh"]["key"],
                            e["ssh"]["known_hosts"])
                  for name, e in entries.items() if name not in in_spec and e.get("ssh")]
        return SshHost(spec, state_dir, spec_dir, check=lab_route_check, former=former)
    from haflow.hosts.local import LocalHost

    return LocalHost(state_dir, spec.cluster, tuple(n.name for n in spec.nodes), spec.database.postgres_version)


def lab_route_check(address: str) -> None:
    """An address of the lab's subnet is contacted only through the lab's bridge (design.md §7)."""
    from haflow.lab import net

    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return  # a host name: not the lab's
    if ip in ipaddress.ip_network(net.SAFETY_NET):
        net.check_route(address)
