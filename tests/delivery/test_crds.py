"""crds/ is the source of truth: it validates, meets the resource contract, and the chart carries exact copies."""

from __future__ import annotations

import importlib.util

import pytest
import yaml

from .support import K8S_VERSIONS, ROOT, crd_files, find, load_crd, render_objects, validate_builtin


def _sync_module():
    spec = importlib.util.spec_from_file_location("sync_crds", ROOT / "scripts" / "sync_crds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_crds_folder_has_files():
    if not crd_files():
        pytest.skip("crds/ is empty (the CRD is owned by the operator work)")


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_crd_files_validate(version):
    for path in crd_files():
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert len(docs) == 1, f"{path.name}: one CRD per file"
        validate_builtin(docs[0], version)


def test_crd_contract():
    crd = load_crd()
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "textgenerationservices.genserve.dev"
    assert spec["group"] == "genserve.dev" and spec["scope"] == "Namespaced"
    assert spec["names"]["plural"] == "textgenerationservices"
    assert "tgs" in spec["names"]["shortNames"]
    (version,) = [v for v in spec["versions"] if v["name"] == "v1alpha1"]
    assert version["served"] and version["storage"]
    assert "status" in version["subresources"] and "scale" in version["subresources"]
    columns = {c["name"].lower() for c in version["additionalPrinterColumns"]}
    assert {"model", "shards", "replicas", "ready", "queue", "age"} <= columns
    rules = [r["rule"] for r in _walk_validations(version["schema"]["openAPIV3Schema"])]
    assert any("minReplicas" in r and "maxReplicas" in r for r in rules), rules


def _walk_validations(schema: dict):
    yield from schema.get("x-kubernetes-validations", [])
    for child in schema.get("properties", {}).values():
        yield from _walk_validations(child)
    if isinstance(schema.get("items"), dict):
        yield from _walk_validations(schema["items"])


def test_chart_crd_templates_up_to_date(capsys):
    assert _sync_module().main(["--check"]) == 0, capsys.readouterr().err


def test_chart_crds_equal_crds_folder():
    sync = _sync_module()
    rendered = {c["metadata"]["name"]: c for c in find(render_objects(), "CustomResourceDefinition")}
    sources = [yaml.safe_load(p.read_text()) for p in crd_files()]
    assert sorted(rendered) == sorted(s["metadata"]["name"] for s in sources)
    for source in sources:
        copy = rendered[source["metadata"]["name"]]
        meta = copy["metadata"]
        assert meta["annotations"].pop("helm.sh/resource-policy") == "keep"
        source_labels = source["metadata"].get("labels", {})
        for key in sync.CHART_LABELS:
            if key not in source_labels:
                meta["labels"].pop(key)
        if not meta["annotations"]:
            del meta["annotations"]
        if not meta["labels"]:
            del meta["labels"]
        assert copy == source


def test_sync_escapes_template_braces(tmp_path):
    sync = _sync_module()
    crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
           "metadata": {"name": "things.example.com", "annotations": {"note": "use {{ .x }} literally"}},
           "spec": {"group": "example.com", "names": {"plural": "things", "kind": "Thing"}, "scope": "Namespaced",
                    "versions": []}}
    source = tmp_path / "things.yaml"
    source.write_text(yaml.safe_dump(crd))
    name, text = sync.render_template(source)
    assert name == "crd-things.yaml"
    assert '{{ "{{" }} .x }}' in text and text.startswith("{{- if .Values.crds.enabled }}")
