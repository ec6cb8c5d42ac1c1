"""Operator settings come from GENSERVE_OPERATOR_* when the startup handler runs, never at import."""

from __future__ import annotations

import subprocess
import sys
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


# Module-level statements that mention os.environ, printed one per line. It runs in a fresh
# interpreter: before 3.11.9 CPython keeps one AST-construction depth per interpreter
# (gh-106905), and this session's operator thread builds ASTs too whenever it formats a
# traceback, so an in-process ast.parse can fail with "recursion depth mismatch".
_ENV_READS_AT_IMPORT = """
import ast, sys
from pathlib import Path
for path in sorted(Path(sys.argv[1]).glob("*.py")):
    for node in ast.parse(path.read_text()).body:  # module level only
        if isinstance(node, (ast.Assign, ast.AnnAssign)) or (
                isinstance(node, ast.Expr) and not isinstance(node.value, ast.Constant)):
            if "os.environ" in ast.unparse(node):
                print(f"{path.name}: {ast.unparse(node)}")
"""


def test_no_module_reads_the_environment_at_import():
    done = subprocess.run([sys.executable, "-c", _ENV_READS_AT_IMPORT, str(OPERATOR)],
                          capture_output=True, text=True, check=True)
    assert sorted(OPERATOR.glob("*.py")), "no operator modules found"
    assert done.stdout == "", done.stdout


def test_operator_folder_has_no_init_so_the_stdlib_operator_wins():
    assert not (OPERATOR / "__init__.py").exists()
