"""`status` on servers where one does not answer (powered off, cut off): that server is a
problem in the report, never an error of the whole command."""

from pathlib import Path

import yaml

from haflow.dags import Dags
from haflow.errors import HaflowError
from haflow.hosts.local import LocalHost
from haflow.spec import default_spec_text, parse_spec


class OneServerCutOff(LocalHost):
    """A local host whose node3 answers nothing, as a real one cut off the network would."""

    def tree_checksum(self, node: str, dest: Path) -> str | None:
        if node == "node3":
            raise HaflowError("node3: cannot reach 10.0.0.13 over SSH (TimeoutError)")
        return "abc"


def test_a_node_whose_server_does_not_answer_is_reported_unreachable_not_raised(tmp_path):
    spec = parse_spec(yaml.safe_load(default_spec_text()))
    host = OneServerCutOff(tmp_path / "state", spec.cluster, tuple(n.name for n in spec.nodes), None)
    st = Dags(spec, tmp_path, tmp_path / "state", host).status()
    assert st["unreachable"] == ["node3"]
    assert [n["node"] for n in st["nodes"]] == ["node1", "node2"] and st["agree"] is True


def test_the_airflow_layer_names_the_unreachable_dag_folder():
    from haflow.components import airflow

    dags = {"agree": True, "unreachable": ["node3"]}
    problems = airflow.dag_problems(dags)
    assert problems == ["cannot read the DAG folder on node3 (its server does not answer)"]
    assert airflow.dag_problems({"agree": False, "unreachable": []}) == ["DAG folders differ between nodes (`haflow dags push`)"]
    assert airflow.dag_problems({"agree": True, "unreachable": []}) == []
