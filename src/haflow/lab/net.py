"""The lab's private network: one bridge on this machine, NAT to the package mirror, nothing else.

Safety first (design.md §7): an `unreachable` route for the whole lab range is added before
anything else and removed last, so a packet for a lab address never leaves the machine when the
bridge is missing; every connection to a lab host is preceded by `check_route` (the kernel must
route it through our bridge). The hosts may reach the machine's resolver on port 53 and TCP
80/443 through the NAT (what apt needs), nothing else; lab <-> lab traffic is accepted first
because br_netfilter sends bridged IPv4 through the forward hook too.

Partitions use a table of their own (`table bridge hflabpart`), so healing is deleting it.
"""

from __future__ import annotations

import ipaddress
import subprocess
from pathlib import Path

from haflow.errors import HaflowError, UserError

BRIDGE = "hflab0"
SUBNET = ipaddress.ip_network("10.213.0.0/24")
SAFETY_NET = "10.213.0.0/16"  # unreachable, so a lab address never leaves the machine
GATEWAY = "10.213.0.1"
NAT_TABLE = "hflab"  # table ip hflab
PARTITION_TABLE = "hflabpart"  # table bridge hflabpart
FORWARD_FILE = "ip_forward.orig"
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
RESOLV_CONF = Path("/etc/resolv.conf")


class LabNetError(HaflowError):
    """The lab network is not as it must be (a route not through the bridge, a command failed)."""


def _run(argv: list[str], stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise LabNetError(f"`{' '.join(argv)}` failed: {(r.stderr or r.stdout).strip()[-300:]}")
    return r


def host_address(index: int) -> str:
    """lab1 is 10.213.0.11, lab2 .12, ..."""
    return str(SUBNET.network_address + 10 + index)


def resolvers() -> list[str]:
    """The machine's IPv4 name servers: the only addresses outside the lab the hosts may ask."""
    out = []
    try:
        for line in RESOLV_CONF.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                try:
                    if ipaddress.ip_address(parts[1]).version == 4:
                        out.append(parts[1])
                except ValueError:
                    continue
    except OSError:
        pass
    return out


def _ruleset() -> str:
    dns = resolvers()
    dns_rule = (f'    iifname "{BRIDGE}" ip saddr {SUBNET} ip daddr {{ {", ".join(dns)} }} meta l4proto {{ tcp, udp }} '
                "th dport 53 accept\n") if dns else ""
    return (
        f"table ip {NAT_TABLE} {{\n"
        "  chain postrouting { type nat hook postrouting priority srcnat; policy accept;\n"
        f'    ip saddr {SUBNET} oifname != "{BRIDGE}" masquerade\n'
        "  }\n"
        "  chain forward { type filter hook forward priority filter; policy accept;\n"
        f'    iifname "{BRIDGE}" oifname "{BRIDGE}" accept\n'
        "    ct state established,related accept\n"
        f"{dns_rule}"
        f'    iifname "{BRIDGE}" ip saddr {SUBNET} tcp dport {{ 80, 443 }} accept\n'
        f'    iifname "{BRIDGE}" counter drop\n'
        f'    oifname "{BRIDGE}" counter drop\n'
        "  }\n"
        "}\n"
    )


def up(run_dir: Path) -> None:
    """Bring the network up (idempotent): safety route, bridge, NAT and filter, forwarding."""
    _run(["ip", "route", "replace", "unreachable", SAFETY_NET, "metric", "4000"])
    if _run(["ip", "link", "show", BRIDGE], check=False).returncode != 0:
        _run(["ip", "link", "add", BRIDGE, "type", "bridge"])
    _run(["ip", "addr", "replace", f"{GATEWAY}/{SUBNET.prefixlen}", "dev", BRIDGE])
    _run(["ip", "link", "set", BRIDGE, "up"])
    # a probe sent before a host has its address is retried at this pace (default 1 s)
    Path(f"/proc/sys/net/ipv4/neigh/{BRIDGE}/retrans_time_ms").write_text("100")
    _run(["nft", "delete", "table", "ip", NAT_TABLE], check=False)
    _run(["nft", "-f", "-"], stdin=_ruleset())
    saved = run_dir / FORWARD_FILE
    if not saved.exists():
        saved.write_text(IP_FORWARD.read_text())
    IP_FORWARD.write_text("1")


def down(run_dir: Path) -> None:
    """Remove everything `up` and the partitions added (idempotent); forwarding as it was."""
    _run(["nft", "delete", "table", "bridge", PARTITION_TABLE], check=False)
    _run(["nft", "delete", "table", "ip", NAT_TABLE], check=False)
    if _run(["ip", "link", "show", BRIDGE], check=False).returncode == 0:
        _run(["ip", "link", "delete", BRIDGE])
    saved = run_dir / FORWARD_FILE
    if saved.exists():
        IP_FORWARD.write_text(saved.read_text().strip() or "0")
        saved.unlink()
    _run(["ip", "route", "del", "unreachable", SAFETY_NET], check=False)  # last: the safety net


def leftovers() -> list[str]:
    """What of the lab network still exists (empty after `down`)."""
    left = []
    if _run(["ip", "link", "show", BRIDGE], check=False).returncode == 0:
        left.append(f"bridge {BRIDGE}")
    for family, table in (("ip", NAT_TABLE), ("bridge", PARTITION_TABLE)):
        if _run(["nft", "list", "table", family, table], check=False).returncode == 0:
            left.append(f"nft table {family} {table}")
    if SAFETY_NET.split("/")[0] in _run(["ip", "route", "show", "table", "main"]).stdout:
        left.append(f"route unreachable {SAFETY_NET}")
    return left


def check_route(address: str) -> None:
    """Refuse (LabNetError) unless `address` is a lab address the kernel routes through our
    bridge: a missing bridge must never send a lab packet out of the machine."""
    if ipaddress.ip_address(address) not in SUBNET:
        raise LabNetError(f"{address} is not a lab address ({SUBNET}); refusing to connect")
    r = _run(["ip", "-o", "route", "get", address], check=False)
    if r.returncode != 0 or f" dev {BRIDGE} " not in f" {r.stdout} ":
        raise LabNetError(f"{address} is not routed through {BRIDGE} ({(r.stdout or r.stderr).strip()}); "
                          "is the lab up? (`haflow lab up`)")


# --- partitions -----------------------------------------------------------------------------------


def isolate(veth: str, ports: list[str] | None = None) -> None:
    """Cut one host off from every other host and from this machine (its link stays up, so it
    sees timeouts as a real partition would, not a missing route). With `ports`: only TCP to or
    from those ports, and only between the host and the other hosts."""
    _run(["nft", "add", "table", "bridge", PARTITION_TABLE])
    for hook in ("forward", "input", "output"):
        _run(["nft", "add", "chain", "bridge", PARTITION_TABLE, hook,
              f"{{ type filter hook {hook} priority filter; policy accept; }}"])
    if ports:
        # both directions, both ends: new connections and the ones already open
        allowed = "{ " + ", ".join(ports) + " }"
        for match in ("iifname", "oifname"):
            for end in ("dport", "sport"):
                _run(["nft", "add", "rule", "bridge", PARTITION_TABLE, "forward", match, veth, "tcp", end, allowed, "drop"])
        return
    # forward: host <-> host; input/output: the host <-> this machine (through the bridge)
    rules = [("forward", "iifname"), ("forward", "oifname"), ("input", "iifname"), ("output", "oifname")]
    for chain, match in rules:
        _run(["nft", "add", "rule", "bridge", PARTITION_TABLE, chain, match, veth, "drop"])


def parse_ports(text: str) -> list[str]:
    """"4369,25672-25674" -> ["4369", "25672-25674"]; exit 2 on anything else."""
    out = []
    for part in text.split(","):
        bounds = part.strip().split("-")
        if not 1 <= len(bounds) <= 2 or not all(b.isdigit() and 1 <= int(b) <= 65535 for b in bounds) \
                or (len(bounds) == 2 and int(bounds[0]) > int(bounds[1])):
            raise UserError(f"--ports {text!r}: give TCP ports and ranges, e.g. 4369,25672-25674")
        out.append("-".join(str(int(b)) for b in bounds))
    return out


def heal() -> None:
    _run(["nft", "delete", "table", "bridge", PARTITION_TABLE], check=False)
