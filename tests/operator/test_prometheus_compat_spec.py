"""spec.monitoring.compat: the CRD accepts the metric name sets, the operator passes them to the server as
--metrics-compat, and the real server's parser takes the Deployment's arguments."""

from __future__ import annotations

import jsonschema
import pytest
from crd_schema import validate

from genserve.operator.reconcile import server_args
from genserve.operator.spec import SpecError, parse_spec
from genserve.server.cli import build_parser


def body(monitoring: dict) -> dict:
    return {"apiVersion": "genserve.dev/v1alpha1", "kind": "TextGenerationService", "metadata": {"name": "chat"},
            "spec": {"model": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct"}, "monitoring": monitoring}}


def test_vllm_compat_reaches_the_server_flags():
    obj = validate(body({"enabled": True, "compat": ["vllm"]}))
    args = server_args(parse_spec(obj["spec"], "img"))
    assert args[args.index("--metrics-compat") + 1] == "vllm"
    assert build_parser().parse_args(args).metrics_compat == ("vllm",)
    default = server_args(parse_spec(validate(body({}))["spec"], "img"))
    assert "--metrics-compat" not in default


@pytest.mark.parametrize("compat", [["prometheus"], "vllm", ["tgi", "vllm", "tgi"]])
def test_crd_refuses_other_values(compat):
    with pytest.raises(jsonschema.ValidationError):
        validate(body({"compat": compat}))


def test_operator_refuses_an_unknown_set_without_the_crd():
    with pytest.raises(SpecError, match="spec.monitoring.compat"):
        parse_spec(body({"compat": ["sglang"]})["spec"], "img")
