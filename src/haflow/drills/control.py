"""Out-of-band control of a server, for the drills a server cannot do to itself: power it off
hard and on again, cut it off the network and heal it (spec `nodes[].control`).

Each action is a command of the user's (a hypervisor's or cloud's CLI) or of the lab (`haflow
lab poweroff NAME`, ...), run on this machine. Whether it worked is checked on the network, not
taken from the command's exit code: `answers` says whether the server accepts a TCP connection
on its SSH port.
"""

from __future__ import annotations

import shlex
import socket
import subprocess

from haflow.errors import HaflowError, UserError
from haflow.hosts import lab_route_check
from haflow.spec import Spec

POWER = ("power_off", "power_on")
NETWORK = ("isolate", "heal")
BROKER_NETWORK = ("isolate_broker", "heal")
COMMAND_TIMEOUT_S = 120


def command(spec: Spec, node: str, action: str) -> list[str] | None:
    """The node's command for `action`, `{node}`, `{address}` and `{ports}` (the RabbitMQ
    ports between servers: epmd and every node's distribution port) filled in; None when the
    spec gives none."""
    n = spec.node(node)
    argv = getattr(n.control, action) if n.control else None
    if argv is None:
        return None
    return [a.replace("{node}", n.name).replace("{address}", n.address).replace("{ports}", broker_ports(spec))
            for a in argv]


def broker_ports(spec: Spec) -> str:
    """The ports RabbitMQ nodes talk to each other on: epmd, and the distribution ports."""
    first = spec.ports.rabbitmq_dist
    return f"{spec.ports.epmd},{first}-{first + len(spec.nodes) - 1}"


def can(spec: Spec, node: str, actions: tuple[str, ...]) -> bool:
    return all(command(spec, node, a) is not None for a in actions)


def require(spec: Spec, node: str, actions: tuple[str, ...], drill: str) -> None:
    """Exit 2 when the spec cannot do `actions` to the node."""
    missing = [a for a in actions if command(spec, node, a) is None]
    if missing:
        raise UserError(f"the {drill} drill needs nodes[].control.{' and .'.join(missing)} for {node} (commands run "
                        "on this machine that do it to the server, e.g. a hypervisor's CLI; `haflow lab up` writes "
                        "them for its hosts); see docs/deploy.md")


def run(spec: Spec, node: str, action: str) -> None:
    argv = command(spec, node, action)
    if argv is None:
        raise UserError(f"{node}: the spec gives no nodes[].control.{action}")
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise HaflowError(f"{node}: nodes[].control.{action} ({shlex.join(argv)}) could not run: {e}") from None
    if r.returncode != 0:
        why = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        raise HaflowError(f"{node}: nodes[].control.{action} ({shlex.join(argv)}) exited {r.returncode}: {why[0]}")


def answers(spec: Spec, node: str, timeout: float = 3.0) -> bool:
    """Whether the node's server accepts a TCP connection on its SSH port within `timeout`."""
    n = spec.node(node)
    host, port = (n.ssh.host or n.address, n.ssh.port) if n.ssh else (n.address, 22)
    lab_route_check(host)  # a lab address only through the lab's bridge
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
