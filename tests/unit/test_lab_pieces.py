"""The lab's pieces that need no root: addresses, the nft ruleset, the apt sources of a host."""

from __future__ import annotations

import pytest

from haflow.lab import image, net


def test_host_addresses_are_in_the_lab_subnet():
    assert [net.host_address(i) for i in (1, 2, 5)] == ["10.213.0.11", "10.213.0.12", "10.213.0.15"]


def test_ruleset_lets_hosts_reach_only_the_resolver_and_the_web_through_nat(monkeypatch, tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text("search x\nnameserver 10.255.255.53\nnameserver fd00::1\n")
    monkeypatch.setattr(net, "RESOLV_CONF", conf)
    rules = net._ruleset()
    assert rules.splitlines()[5].strip() == 'iifname "hflab0" oifname "hflab0" accept'  # lab <-> lab first (br_netfilter)
    assert "ip daddr { 10.255.255.53 } meta l4proto { tcp, udp } th dport 53 accept" in rules
    assert "tcp dport { 80, 443 } accept" in rules and 'iifname "hflab0" counter drop' in rules
    assert "fd00::1" not in rules


def test_route_check_refuses_any_address_outside_the_lab_before_asking_the_kernel():
    with pytest.raises(net.LabNetError, match="not a lab address"):
        net.check_route("10.0.0.5")


def test_host_apt_sources_follow_the_release_and_the_machines_mirror():
    text = image.sources("trixie", "http://deb.debian.org/debian")
    assert "Suites: trixie trixie-updates" in text and "URIs: http://deb.debian.org/debian-security" in text
    assert "Suites: trixie-security" in text


def test_unknown_release_is_bad_input(tmp_path):
    from haflow.errors import UserError
    with pytest.raises(UserError, match="unknown release"):
        image.ensure_base(tmp_path, "sid", lambda _: None)
