"""The SSH transport against real sshd on the lab's hosts: parallel connections with strict host
keys, commands as root, files put only when they differ, a dead host reported, not fatal."""

from __future__ import annotations

import asyncio
import time

import pytest

from haflow.hosts.ssh_transport import SshPool, SshTarget
from haflow.lab import KEY, KNOWN_HOSTS, Lab, net

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def lab():
    lab = Lab()
    lab.up(3)
    yield lab
    lab.down()


def pool(lab: Lab) -> SshPool:
    return SshPool([SshTarget(h.name, h.address, key=str(lab.run / KEY), known_hosts=str(lab.run / KNOWN_HOSTS))
                    for h in lab.hosts()], check=net.check_route)


def test_commands_run_on_every_host_in_parallel(lab):
    async def go():
        p = pool(lab)
        try:
            assert await p.connect_all() == {}
            t0 = time.monotonic()
            results = await asyncio.gather(*(p.run(n, "hostname; id -u") for n in p.targets))
            noop_round_s = time.monotonic() - t0
            failing = await p.run("lab1", "exit 3")
            return results, noop_round_s, failing
        finally:
            await p.close()

    results, noop_round_s, failing = asyncio.run(go())
    assert [r.stdout.split() for r in results] == [["lab1", "0"], ["lab2", "0"], ["lab3", "0"]]
    assert noop_round_s < 5  # one round trip per host, at once (a sanity bound, not a benchmark)
    assert failing.rc == 3 and not failing.ok


def test_put_writes_only_what_differs(lab):
    async def go():
        p = pool(lab)
        try:
            path = "/etc/haflow-test/demo.conf"
            first = await p.put("lab2", path, b"a = 1\n", 0o640)
            again = await p.put("lab2", path, b"a = 1\n", 0o640)
            mode = await p.put("lab2", path, b"a = 1\n", 0o600)
            content = await p.put("lab2", path, b"a = 2\n", 0o600)
            seen = await p.run("lab2", f"cat {path}; stat -c '%a %U' {path}")
            await p.run("lab2", "rm -rf /etc/haflow-test")
            return first, again, mode, content, seen.stdout
        finally:
            await p.close()

    first, again, mode, content, seen = asyncio.run(go())
    assert (first, again, mode, content) == (True, False, True, True)
    assert seen.split() == ["a", "=", "2", "600", "root"]


def test_a_powered_off_host_is_reported_and_the_others_still_work(lab):
    lab.poweroff("lab3")
    try:
        async def go():
            p = pool(lab)
            try:
                failed = await p.connect_all()
                ok = await p.run("lab1", "true")
                return failed, ok
            finally:
                await p.close()

        failed, ok = asyncio.run(go())
        assert list(failed) == ["lab3"] and ok.ok
    finally:
        lab.start("lab3")
        asyncio.run(lab._ready(lab.host("lab3")))


def test_a_connection_to_a_host_powered_off_fails_fast_and_is_replaced_after_it_boots(lab):
    """An open connection to a dead server: the command fails within the keepalive window (not
    its own 600 s timeout), and once the server is back the same pool reconnects by itself."""
    async def before_and_during():
        p = pool(lab)
        assert (await p.run("lab3", "true")).ok  # the connection is open and cached
        lab.poweroff("lab3")
        t = time.monotonic()
        try:
            await p.run("lab3", "true", timeout=60)
            failed_with = None
        except Exception as e:  # noqa: BLE001 - which error it is depends on where the write hangs
            failed_with = type(e).__name__
        return p, failed_with, time.monotonic() - t

    async def after(p):
        try:
            return await p.run("lab3", "cat /proc/sys/kernel/random/boot_id")
        finally:
            await p.close()

    loop = asyncio.new_event_loop()
    try:
        p, failed_with, took = loop.run_until_complete(before_and_during())
        assert failed_with is not None and took < 30, (failed_with, took)
        lab.start("lab3")
        loop.run_until_complete(lab._ready(lab.host("lab3")))
        r = loop.run_until_complete(after(p))
        assert r.ok and r.stdout.strip()
    finally:
        loop.close()
        if not lab.host("lab3").running():
            lab.start("lab3")
            asyncio.run(lab._ready(lab.host("lab3")))


def test_an_address_outside_the_lab_is_refused_before_connecting(lab):
    async def go():
        p = SshPool([SshTarget("x", "192.0.2.10")], check=net.check_route)
        return await p.connect_all()

    failed = asyncio.run(go())
    assert "not a lab address" in failed["x"]


def test_a_login_user_other_than_root_works_through_sudo(lab):
    setup = ("id admin >/dev/null 2>&1 || useradd -m -s /bin/bash admin; install -d -m 700 -o admin -g admin ~admin/.ssh; "
             "install -m 600 -o admin -g admin /root/.ssh/authorized_keys ~admin/.ssh/authorized_keys; "
             "echo 'admin ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/admin; chmod 440 /etc/sudoers.d/admin")
    assert asyncio.run(lab.run_on("lab1", setup + "; echo done")).strip().endswith("done")
    h = lab.host("lab1")

    async def go():
        p = SshPool([SshTarget("lab1", h.address, user="admin", key=str(lab.run / KEY),
                               known_hosts=str(lab.run / KNOWN_HOSTS))], check=net.check_route)
        try:
            who = await p.run("lab1", "id -u; whoami")
            changed = await p.put("lab1", "/etc/haflow-sudo-test", b"x\n", 0o600)
            owner = await p.run("lab1", "stat -c '%U %a' /etc/haflow-sudo-test; rm -f /etc/haflow-sudo-test")
            await p.run("lab1", "rm -f /etc/sudoers.d/admin")
            refused = await p.run("lab1", "id -u")  # without its sudo rule, root is out of reach
            return who.stdout.split(), changed, owner.stdout.split(), refused
        finally:
            await p.close()

    who, changed, owner, refused = asyncio.run(go())
    assert who == ["0", "root"] and changed and owner == ["root", "600"]
    assert not refused.ok and "password" in refused.stderr.lower()
