"""Every broken spec is refused before anything starts: exit 2, the field named, no internal
error, no process, no state directory, and no error output larger than the spec.

The broken specs are generated: every field of the default spec gets every wrong value of its
kind, then seeded random combinations of two or three such mutations, then damage at the text
level (YAML the spec loader must refuse)."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from click.testing import CliRunner

from haflow.cli import cli
from haflow.spec import default_spec_text

BASE = yaml.safe_load(default_spec_text())
BAD_INT = ["12", True, -1, 10**15, 1.5, None, [], {"a": 1}]
BAD_BOOL = ["true", 1, None, [], "on"]
BAD_STR = [5, "", "x\ny", "bell\x07", "Z" * 300, [], True, None]
BAD_LIST = ["node1", 5, {"a": 1}]
BAD_PARAM_VALUES = [True, -1, 10**15, [], "lots", None, 1.5]
BAD_PARAMS = [{"synchronous_commit": "off"}, {"password_encryption": "md5"}, {"archive_command": "cp %p /x"},
              {"include_dir": "conf.d"}, {"port": 6000}, {"fsync": "off"}, {"Bad Name": 1}, {"work_mem": [1]}]
STRING_FIELDS_OPTIONAL = {("airflow", "dags"), ("database", "postgres_version")}  # null is valid there


def leaves(data: Any, path: tuple = ()) -> list[tuple]:
    if path == ("database", "parameters"):  # the whole mapping, and each value
        return [path, *[(*path, k) for k in data]]
    if isinstance(data, dict):
        return [p for k, v in data.items() for p in leaves(v, (*path, k))]
    if isinstance(data, list) and path == ("nodes",):
        return [p for i, v in enumerate(data) for p in leaves(v, (*path, i))]
    return [path]


def label(path: tuple) -> str:
    """The field path as haflow's errors write it: nodes[1].name."""
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(path))


def get(data: Any, path: tuple) -> Any:
    for p in path:
        data = data[p]
    return data


def put(data: Any, path: tuple, value: Any) -> None:
    get(data, path[:-1])[path[-1]] = value


def bad_values(path: tuple, value: Any) -> list[Any]:
    if path == ("database", "parameters"):
        return [{**value, **p} for p in BAD_PARAMS]
    if path[:2] == ("database", "parameters"):  # max_connections, shared_buffers
        return BAD_PARAM_VALUES
    if isinstance(value, bool):
        return BAD_BOOL
    if isinstance(value, int):
        return BAD_INT
    if isinstance(value, list):
        return BAD_LIST + [[]]
    if value is None or isinstance(value, str):
        return [v for v in BAD_STR if not (v is None and path in STRING_FIELDS_OPTIONAL)]
    raise AssertionError(f"no bad values for {path}")


def single_mutations() -> list[tuple[str, dict]]:
    cases = []
    for path in leaves(BASE):
        for bad in bad_values(path, get(BASE, path)):
            data = copy.deepcopy(BASE)
            put(data, path, bad)
            cases.append((label(path), data))
    structural = [
        ("cluster", lambda d: d.pop("cluster")),
        ("nodes", lambda d: d.pop("nodes")),
        ("nodes", lambda d: d.update(nodes=d["nodes"][:2])),
        ("nodes", lambda d: d.update(nodes=[{"name": f"n{i}", "address": f"127.0.1.{i}"} for i in range(17)])),
        ("nodes[2].name", lambda d: d["nodes"][2].update(name="node1")),
        ("nodes[2].address", lambda d: d["nodes"][2].update(address="127.0.0.11")),
        ("nodes[0].address", lambda d: d["nodes"][0].update(address="224.0.0.5")),
        ("nodes[0].address", lambda d: d["nodes"][0].update(address="255.255.255.255")),
        ("nodes[0].address", lambda d: d["nodes"][0].update(address="0.1.2.3")),
        ("nodes[0].address", lambda d: d["nodes"][0].update(address="::1")),
        ("nodes[1].adress", lambda d: d["nodes"][1].update(adress="x")),
        ("databse", lambda d: d.update(databse={})),
        ("ports", lambda d: d["ports"].update(pg_primary=5432)),
        ("ports.rabbitmq_dist", lambda d: d["ports"].update(rabbitmq_dist=65535)),
        ("ports.rabbitmq_dist", lambda d: d["ports"].update(rabbitmq_dist=7999)),
        ("etcd.members", lambda d: d["etcd"].update(members=[])),
        ("etcd.members", lambda d: d["etcd"].update(members=["node1", "node2"])),
        ("etcd.members", lambda d: d["etcd"].update(members=["node1", "node2", "node9"])),
        ("database", lambda d: d["database"].update(loop_wait=15)),
        ("broker.consumer_timeout_s", lambda d: d["broker"].update(consumer_timeout_s=3600)),
        ("airflow.version", lambda d: d["airflow"].update(version="3.3.9")),
        ("airflow.dags", lambda d: d["airflow"].update(dags=".")),
        ("airflow.dags", lambda d: d["airflow"].update(dags="/")),
        ("airflow.dags", lambda d: d["airflow"].update(dags="no-such-folder")),
        ("ports", lambda d: d.update(ports=[1, 2])),
        ("spec", lambda d: d.clear()),
    ]
    for field, mutate in structural:
        data = copy.deepcopy(BASE)
        mutate(data)
        cases.append((field, data))
    return cases


def combined_mutations(n: int, seed: int = 8) -> list[tuple[str, dict]]:
    """n specs with 2-3 single mutations each (one of the mutated fields must be named: the DAG
    folder's existence is checked only once the rest is valid)."""
    rng = random.Random(seed)
    singles = [c for c in single_mutations() if "." in c[0] and not c[0].startswith("nodes") and "[" not in c[0]]
    out = []
    for _ in range(n):
        picks = rng.sample(singles, rng.randint(2, 3))
        data = copy.deepcopy(BASE)
        for field, mutated in picks:
            path = tuple(field.split("."))
            put(data, path, copy.deepcopy(get(mutated, path)))
        out.append(("|".join(f for f, _ in picks), data))
    return out


def text_mutations() -> list[tuple[str, bytes]]:
    text = default_spec_text()
    return [
        ("line", (text + "cluster: again\n").encode()),  # duplicate key
        ("line", (text + "extra: &a [1, 2]\nmore: *a\n").encode()),  # alias
        ("line", ("a: &x [1,1,1,1,1,1,1,1,1]\nb: &y [*x,*x,*x,*x,*x,*x,*x,*x,*x]\nc: [*y,*y,*y,*y,*y,*y,*y,*y,*y]\n").encode()),
        ("line", ("x: " + "[" * 3000 + "]" * 3000 + "\n").encode()),  # deep nesting
        ("line", ("x:\n" + "".join(" " * i + "- \n" for i in range(0, 60, 2))).encode()),
        ("binary", text.encode()[:100] + b"\0\0\0" + text.encode()[100:]),
        ("UTF-8", text.encode().replace(b"haflow", b"h\xe9flow", 1)),
        ("line", (text + "\tbad: tab\n").encode()),
        ("line", b"cluster: [unclosed\n"),
        ("too large", (text + "#" * 300_000 + "\n").encode()),
        ("mapping", b""),
        ("mapping", b"- just\n- a list\n"),
        ("mapping", b"just a string\n"),
        ("line", b"cluster: !!python/object:os.system x\n"),
        ("line", b"? [complex, key]\n: value\n"),
    ]


def generated_cases() -> list[tuple[str, bytes]]:
    cases = [(f, yaml.safe_dump(d).encode()) for f, d in single_mutations() + combined_mutations(60)]
    return cases + text_mutations()


CASES = generated_cases()


def test_the_fuzz_covers_at_least_200_broken_specs():
    assert len(CASES) >= 200, len(CASES)


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


@pytest.mark.parametrize("field,raw", CASES, ids=[f"{i}-{c[0]}" for i, c in enumerate(CASES)])
def test_every_broken_spec_exits_2_naming_the_field_and_starting_nothing(tmp_path, runner, field, raw):
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(raw)
    state = tmp_path / "state"
    for args in (["validate", "-f", str(spec)], ["up", "-f", str(spec), "--state-dir", str(state)]):
        r = runner.invoke(cli, args)
        out = r.output + (r.stderr if r.stderr_bytes is not None and r.stderr not in r.output else "")
        assert r.exit_code == 2, (args[0], field, out[:2000])
        assert "internal error" not in out and "Traceback" not in out, out[:2000]
        fields = [f.split("[")[0] for f in field.split("|")]
        assert any(f in out for f in fields), (field, out[:2000])
        assert len(out.encode()) <= max(len(raw), 4000), (len(out), len(raw))
    assert not state.exists()  # nothing created
    assert psutil.Process().children(recursive=True) == []  # nothing started


def test_a_fifo_given_as_the_spec_is_refused_without_blocking(tmp_path, runner):
    import os

    fifo = tmp_path / "spec.yaml"
    os.mkfifo(fifo)
    r = runner.invoke(cli, ["validate", "-f", str(fifo)])
    assert r.exit_code == 2 and "FIFO" in r.output


def test_a_device_given_as_the_spec_is_refused(runner):
    r = runner.invoke(cli, ["validate", "-f", "/dev/zero"])
    assert r.exit_code == 2 and "device" in r.output


def test_validate_accepts_the_default_and_changes_nothing(tmp_path, runner):
    spec = tmp_path / "spec.yaml"
    spec.write_text(default_spec_text())
    before = sorted(Path(tmp_path).iterdir())
    r = runner.invoke(cli, ["validate", "-f", str(spec)])
    assert r.exit_code == 0 and "valid" in r.output
    assert sorted(Path(tmp_path).iterdir()) == before
