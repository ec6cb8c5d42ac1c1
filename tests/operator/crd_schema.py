"""What a real API server does with our CRD, done locally: defaulting, strict schema validation, CEL rules."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import yaml

CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / "textgenerationservices.yaml"


def load_crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


def openapi_schema(crd: dict[str, Any]) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def strict_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Unknown fields become errors (kubectl --validate=strict) instead of being pruned silently."""
    out = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and \
                    not node.get("x-kubernetes-preserve-unknown-fields") and node is not out:
                node.setdefault("additionalProperties", False)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    walk(out)
    return out


def apply_defaults(schema: dict[str, Any], obj: Any) -> Any:
    """Structural defaulting as the API server does it: fill `default` where a field is absent."""
    if not isinstance(obj, dict) or schema.get("type") != "object":
        if isinstance(obj, list) and "items" in schema:
            return [apply_defaults(schema["items"], item) for item in obj]
        return obj
    out = dict(obj)
    for key, sub in (schema.get("properties") or {}).items():
        if key not in out and "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
        if key in out:
            out[key] = apply_defaults(sub, out[key])
    return out


def validate(obj: dict[str, Any], crd: dict[str, Any] | None = None) -> dict[str, Any]:
    """Defaulted object, or jsonschema.ValidationError / CelRuleError like a rejected apply."""
    schema = openapi_schema(crd or load_crd())
    jsonschema.validate(obj, strict_json_schema(schema))
    defaulted = apply_defaults(schema, obj)
    check_cel_rules(schema, defaulted)
    return defaulted


class CelRuleError(ValueError):
    pass


def check_cel_rules(schema: dict[str, Any], obj: Any) -> None:
    import celpy  # cel-python; optional, the tests skip CEL checks without it

    env = celpy.Environment()
    for rule in schema.get("x-kubernetes-validations") or []:
        program = env.program(env.compile(rule["rule"]))
        if not program.evaluate({"self": celpy.json_to_cel(obj)}):
            raise CelRuleError(rule["message"])
    if isinstance(obj, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in obj:
                check_cel_rules(sub, obj[key])
    elif isinstance(obj, list) and "items" in schema:
        for item in obj:
            check_cel_rules(schema["items"], item)
