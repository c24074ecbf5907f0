"""The lab tier: real Debian hosts booted with systemd-nspawn on a private bridge.

One lab for the module: up -> every host answers over SSH with a running systemd -> a second up
changes nothing -> power-off and start -> isolate and heal -> down leaves nothing. Needs root,
debootstrap, systemd-nspawn and nft (`haflow lab up` installs them); the base image is built by
the first run and cached."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time

import pytest

from haflow.lab import Lab, net
from haflow.lab.net import LabNetError
from haflow.spec import load_spec

pytestmark = pytest.mark.lab
HAFLOW = [sys.executable, "-m", "haflow.cli"]


def haflow(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([*HAFLOW, *args], capture_output=True, text=True, timeout=timeout)


def reachable(address: str, port: int = 22, timeout: float = 2.0) -> bool:
    net.check_route(address)
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def lab():
    r = haflow("lab", "up", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    yield json.loads(r.stdout)
    haflow("lab", "down")


def test_lab_up_boots_hosts_that_answer_over_ssh(lab):
    assert lab["up"] and lab["release"] == "trixie" and len(lab["hosts"]) == 3
    l = Lab()
    for h in lab["hosts"]:
        assert h["running"] and h["role"] == "node"
        assert asyncio.run(l.run_on(h["name"], "hostname")).strip() == h["name"]
        assert asyncio.run(l.run_on(h["name"], "systemctl is-system-running")).strip() in ("running", "degraded")
        assert asyncio.run(l.run_on(h["name"], ". /etc/os-release; echo $VERSION_ID")).strip() == "13"
    # each host knows the others by name, at their lab address
    out = asyncio.run(l.run_on("lab1", "getent hosts lab2 lab3"))
    assert "10.213.0.12" in out and "10.213.0.13" in out
    spec = load_spec(__import__("pathlib").Path(lab["spec"]))
    assert [n.address for n in spec.nodes] == [h["address"] for h in lab["hosts"]]
    assert all(n.ssh and n.ssh.key == lab["key"] for n in spec.nodes)


def test_host_keys_are_checked_strictly(lab, tmp_path):
    import asyncssh
    other = tmp_path / "known_hosts"
    other.write_text("10.213.0.11,lab1 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHNvbWVvdGhlcmtleXNvbWVvdGhlcmtleXNvbWVvdGg=\n")

    async def connect() -> None:
        async with asyncssh.connect("10.213.0.11", username="root", client_keys=[lab["key"]], known_hosts=str(other)):
            pass

    net.check_route("10.213.0.11")
    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        asyncio.run(connect())


def test_a_second_up_changes_nothing(lab):
    before = {h.name: h.init() for h in Lab().hosts()}
    r = haflow("lab", "up", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert {h.name: h.init() for h in Lab().hosts()} == before
    r = haflow("lab", "up", "--nodes", "5")
    assert r.returncode == 2 and "lab down" in r.stderr


def test_power_off_and_start_again(lab):
    l = Lab()
    host = l.host("lab3")
    t0 = time.monotonic()
    l.poweroff("lab3")
    assert not host.running() and host.refs() == []
    assert not reachable(host.address)
    assert time.monotonic() - t0 < 15
    st = json.loads(haflow("lab", "status", "--json").stdout)
    assert [h["running"] for h in st["hosts"]] == [True, True, False]
    assert haflow("lab", "status").returncode == 1
    l.start("lab3")
    asyncio.run(l._ready(host))
    assert asyncio.run(l.run_on("lab3", "hostname")).strip() == "lab3"


def test_isolate_cuts_a_host_off_and_heal_restores_it(lab):
    l = Lab()
    probe = "python3 -c \"import socket; socket.create_connection(('{}', 22), timeout=2); print('ok')\""
    assert asyncio.run(l.run_on("lab1", probe.format("10.213.0.12"))).strip() == "ok"
    l.isolate("lab2")
    try:
        assert not reachable("10.213.0.12")  # from this machine
        assert asyncio.run(l.run_on("lab1", probe.format("10.213.0.12") + " 2>/dev/null")).strip() != "ok"  # from a host
        assert asyncio.run(l.run_on("lab1", probe.format("10.213.0.13"))).strip() == "ok"  # the others still talk
    finally:
        l.heal()
    deadline = time.monotonic() + 10
    while not reachable("10.213.0.12") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert reachable("10.213.0.12")


def test_route_check_refuses_addresses_outside_the_lab(lab):
    with pytest.raises(LabNetError, match="not a lab address"):
        net.check_route("192.0.2.10")


def test_down_leaves_nothing_and_can_be_rerun(lab):
    hosts = Lab().hosts()
    refs = [r for h in hosts for r in h.refs()]
    assert len(refs) == 6  # nspawn and init of each host
    r = haflow("lab", "down")
    assert r.returncode == 0, r.stderr[-2000:]
    assert Lab().leftovers(hosts, refs) == []  # no host process, folder, mount, bridge, route or nft table
    assert net.leftovers() == []
    # with the bridge gone, a lab address is refused before any packet is sent
    with pytest.raises(LabNetError):
        net.check_route("10.213.0.11")
    assert haflow("lab", "down").returncode == 0
    st = json.loads(haflow("lab", "status", "--json").stdout)
    assert st["up"] is False and st["hosts"] == []
