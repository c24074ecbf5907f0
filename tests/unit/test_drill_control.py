"""Out-of-band control for the real-network drills: the spec's commands, the writer on the
isolated server and the node-partition verdict."""

import copy
import subprocess
import sys
import time

import pytest
import yaml

from haflow.drills import control
from haflow.drills.isolated_writer import _pgpass_line, parse
from haflow.drills.monitor import Timeline
from haflow.drills.runner import _broker_partition_verdict, _partition_verdict
from haflow.drills.scenarios import BrokerWatch
from haflow.drills.scenarios import runnable
from haflow.lab import control_commands
from haflow.spec import default_spec_text, load_spec

HAFLOW = [sys.executable, "-m", "haflow.cli"]


def spec_with(tmp_path, ctl=None, ssh=True):
    data = yaml.safe_load(default_spec_text())
    for i, n in enumerate(data["nodes"]):
        n["address"] = f"10.9.0.{11 + i}"
        if ssh:
            n["ssh"] = {"user": "root"}
        if ctl is not None:
            n["control"] = copy.deepcopy(ctl)  # no YAML aliases: a spec refuses them
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_commands_fill_in_the_node_and_its_address(tmp_path):
    spec = load_spec(spec_with(tmp_path, {"power_off": ["virsh", "destroy", "vm-{node}"], "power_on": ["virsh", "start", "vm-{node}"],
                                          "isolate": ["cut", "{address}"], "heal": ["heal", "{address}"]}))
    assert control.command(spec, "node2", "power_off") == ["virsh", "destroy", "vm-node2"]
    assert control.command(spec, "node3", "isolate") == ["cut", "10.9.0.13"]
    assert control.can(spec, "node1", control.POWER + control.NETWORK)
    assert "node-partition" in runnable(spec)


def test_without_network_control_node_partition_is_refused_and_all_skips_it(tmp_path):
    spec = load_spec(spec_with(tmp_path, {"power_off": ["a"], "power_on": ["b"]}))
    assert "node-partition" not in runnable(spec) and "node-crash" in runnable(spec)
    with pytest.raises(Exception) as e:
        control.require(spec, "node1", control.NETWORK, "node-partition")
    assert "nodes[].control.isolate and .heal for node1" in str(e.value)
    # the CLI says so with exit 2 before it touches anything (no cluster state exists here)
    r = subprocess.run([*HAFLOW, "drill", "node-partition", "-f", str(spec_with(tmp_path))], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "node-partition drill needs nodes[].control.isolate" in r.stderr, r.stderr


@pytest.mark.parametrize("ctl, why", [
    ({"power_off": ["x"]}, "power_off without power_on"),
    ({"heal": ["x"]}, "heal without isolate"),
    ({"isolate_broker": ["x"]}, "isolate_broker without heal"),
    ({"isolate": [], "heal": ["x"]}, "non-empty list of arguments"),
    ({"power_off": "virsh destroy x", "power_on": ["x"]}, "nodes[0].control.power_off"),
])
def test_bad_control_is_a_spec_error(tmp_path, ctl, why):
    r = subprocess.run([*HAFLOW, "validate", "-f", str(spec_with(tmp_path, ctl))], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and why in r.stderr, r.stderr


def test_control_on_a_local_node_is_a_spec_error(tmp_path):
    r = subprocess.run([*HAFLOW, "validate", "-f", str(spec_with(tmp_path, {"power_off": ["a"], "power_on": ["b"]}, ssh=False))],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "control is for servers reached over SSH" in r.stderr, r.stderr


def test_a_failing_control_command_names_the_node_the_action_and_why(tmp_path):
    spec = load_spec(spec_with(tmp_path, {"power_off": ["sh", "-c", "echo no such vm >&2; exit 3"], "power_on": ["true"]}))
    with pytest.raises(Exception) as e:
        control.run(spec, "node1", "power_off")
    assert "node1: nodes[].control.power_off" in str(e.value) and "exited 3: no such vm" in str(e.value)
    control.run(spec, "node1", "power_on")  # exit 0: no error


def test_the_lab_writes_its_own_verbs_as_control():
    ctl = control_commands("lab2")
    assert ctl["power_off"][-2:] == ["poweroff", "lab2"] and ctl["isolate"][-2:] == ["isolate", "lab2"]
    assert ctl["heal"][-1] == "heal" and ctl["power_on"][0] == sys.executable


def test_pgpass_escapes_colons_and_backslashes():
    assert _pgpass_line("10.0.0.1", 5432, "db", "u", "a:b\\c") == "10.0.0.1:5432:db:u:a\\:b\\\\c"


def _log(cut):
    return parse("\n".join([
        f"{cut - 2} {cut - 1.9} ok 1",
        f"{cut - 0.5} {cut + 0.2} ok 2",  # begun before the cut: may legitimately be acknowledged
        f"{cut + 0.3} {cut + 19.0} err 3",  # hung on the lost standby until Patroni demoted the server
        f"{cut + 19.1} {cut + 19.2} err 4",
        "garbage line",
    ]))


def test_partition_verdict_passes_when_the_isolated_primary_acknowledged_nothing_after_the_cut():
    cut = time.time()
    fields, violations = _partition_verdict(_log(cut), cut, Timeline(), {"majority_primary": "node2", "majority_primary_s": 24.0})
    assert violations == []
    assert fields["isolated_primary_writes_acknowledged"] == 0 and fields["split_brain"] is False
    assert fields["isolated_primary_refuses_writes_s"] == 19.0 and fields["isolated_writes_attempted"] == 4


def test_partition_verdict_fails_on_a_write_acknowledged_after_the_cut_and_without_a_new_primary():
    cut = time.time()
    log = _log(cut)
    log.attempts.append(parse(f"{cut + 1} {cut + 1.1} ok 5").attempts[0])
    fields, violations = _partition_verdict(log, cut, Timeline(), {})
    assert fields["split_brain"] is True and fields["isolated_primary_writes_acknowledged"] == 1
    assert any("split brain" in v for v in violations) and any("elected no primary" in v for v in violations)


def test_partition_verdict_fails_without_the_writer_log_or_a_refusal():
    cut = time.time()
    _, violations = _partition_verdict(None, cut, Timeline(), {"majority_primary": "node2"})
    assert any("left no log" in v for v in violations)
    _, violations = _partition_verdict(parse(f"{cut - 1} {cut - 0.9} ok 1"), cut, Timeline(), {"majority_primary": "node2"})
    assert violations == ["the isolated old primary never refused a write after the cut"]


def test_api_get_asks_again_while_the_balancer_has_no_api_server(monkeypatch):
    """A 503 from HAProxy (every api-server failing its check for a moment on a busy machine)
    is asked again; a run's state poll never ends in an internal error for it."""
    import httpx

    from haflow.components import airflow_api

    answers = iter([503, 502, 200])
    seen = []

    def handler(request):
        seen.append(request.url.path)
        return httpx.Response(next(answers), json={"state": "success"})

    client = object.__new__(airflow_api.ApiClient)
    client.base, client.http = "http://lb", httpx.Client(transport=httpx.MockTransport(handler))
    monkeypatch.setattr(airflow_api.time, "sleep", lambda s: None)
    assert client.get("/dags/x").status_code == 200 and len(seen) == 3
    answers = iter([503] * 5)
    assert client.get("/dags/x").status_code == 503  # given up after the attempts: the caller decides
    answers = iter([404])
    assert client.get("/dags/x").status_code == 404  # an answer from Airflow itself is not retried


def test_the_broker_cut_names_the_ports_rabbitmq_nodes_talk_on(tmp_path):
    spec = load_spec(spec_with(tmp_path, {"isolate_broker": ["cut", "{node}", "{ports}"], "heal": ["heal"]}))
    assert control.command(spec, "node2", "isolate_broker") == ["cut", "node2", "4369,25672-25674"]
    assert "broker-partition" in runnable(spec) and "node-partition" not in runnable(spec)
    lab = control_commands("lab1")["isolate_broker"]
    assert lab[-4:] == ["isolate", "lab1", "--ports", "{ports}"]


def test_lab_ports_are_checked_before_anything_is_cut():
    from haflow.lab import net
    assert net.parse_ports("4369, 25672-25674") == ["4369", "25672-25674"]
    for bad in ("4369;drop", "25674-25672", "0", "70000", "a-b", ""):
        with pytest.raises(Exception, match="give TCP ports and ranges"):
            net.parse_ports(bad)
    r = subprocess.run([*HAFLOW, "lab", "isolate", "lab1", "--ports", "22,x"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--ports '22,x'" in r.stderr, r.stderr


def _watch(cut_seen=None, paused=None, moved=None) -> BrokerWatch:
    w = BrokerWatch.__new__(BrokerWatch)  # its measurements only, no thread
    w.victim, w.cut_seen, w.paused, w.leader_moved = "node1", cut_seen, paused, moved
    return w


def test_broker_partition_verdict_passes_when_the_cut_node_paused_and_the_leader_moved():
    extra, violations = _broker_partition_verdict(_watch(100.0 + 16, 100.0 + 17.5, (100.0 + 20, "node2")), 100.0, Timeline())
    assert violations == [] and extra == {"broker_cut_seen_s": 16.0, "broker_paused_s": 17.5, "new_queue_leader": "node2",
                                          "queue_leader_moved_s": 20.0}


def test_broker_partition_verdict_fails_when_it_never_paused_or_the_leader_stayed():
    extra, violations = _broker_partition_verdict(_watch(cut_seen=116.0), 100.0, Timeline())
    assert any("never paused" in v for v in violations) and any("did not move off node1" in v for v in violations)
    assert extra["broker_paused_s"] is None and extra["new_queue_leader"] is None
