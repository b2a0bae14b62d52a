"""Every deployment in prefect.yaml points at a flow that loads, with parameters its schema accepts."""

from __future__ import annotations

from pathlib import Path

import yaml
from prefect.flows import load_flow_from_entrypoint
from prefect.utilities.callables import parameter_schema

ROOT = Path(__file__).resolve().parent.parent


def test_prefect_yaml_entrypoints_load():
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployments = config["deployments"]
    assert {d["name"] for d in deployments} >= {"image-to-3d"}
    for deployment in deployments:
        flow = load_flow_from_entrypoint(str(ROOT / deployment["entrypoint"]))
        schema = parameter_schema(flow.fn)
        assert set(deployment.get("parameters", {})) <= set(schema.properties), deployment["name"]
