"""Operator settings come from GENSERVE_OPERATOR_* when the startup handler runs, never at import."""

from __future__ import annotations

import ast
from pathlib import Path

from genserve.operator.settings import OperatorSettings

OPERATOR = Path(__file__).resolve().parents[2] / "operator"


def test_defaults_and_overrides_from_the_environment():
    assert OperatorSettings.from_env({}) == OperatorSettings()
    settings = OperatorSettings.from_env({"GENSERVE_OPERATOR_DEFAULT_IMAGE": "registry/genserve:2",
                                          "GENSERVE_OPERATOR_SCRAPE_TIMEOUT_SECONDS": "0.5",
                                          "GENSERVE_OPERATOR_PRESTOP_SLEEP_SECONDS": "3",
                                          "UNRELATED": "x"})
    assert settings.default_image == "registry/genserve:2"
    assert settings.scrape_timeout_seconds == 0.5 and settings.prestop_sleep_seconds == 3


def test_no_module_reads_the_environment_at_import():
    for path in OPERATOR.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only
            if isinstance(node, (ast.Assign, ast.AnnAssign)) or (
                    isinstance(node, ast.Expr) and not isinstance(node.value, ast.Constant)):
                assert "os.environ" not in ast.unparse(node), f"{path.name}: {ast.unparse(node)}"


def test_operator_folder_has_no_init_so_the_stdlib_operator_wins():
    assert not (OPERATOR / "__init__.py").exists()
