"""The settings model (maskfleet/settings.py): the one reader of `MASKFLEET_*`, and the docs made from it."""
from __future__ import annotations

import ast
import logging
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest

from maskfleet.job_pipeline import DTYPES
from maskfleet.sampling.job_batch import FORWARDS
from maskfleet.settings import Settings, load_settings, settings_markdown, unknown_variables, variable

REPO = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = ("maskfleet", "sampling", "storage", "tasks", "worker")


def test_docs_settings_md_is_generated_from_the_model():
    assert (REPO / "docs" / "settings.md").read_text() == settings_markdown(), \
        "docs/settings.md is stale: python -m maskfleet.settings > docs/settings.md"
    for field in Settings.model_fields:
        assert f"`{variable(field)}`" in settings_markdown()


def _environment_reads(path: Path, root: Path = REPO) -> list[str]:
    """os.environ / os.getenv reads of a MASKFLEET_ name (or of any name not a literal) in a module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            target = ast.unparse(node.func.value)
            if (target == "os.environ" and node.func.attr == "get") or ast.unparse(node.func) == "os.getenv":
                arg = node.args[0] if node.args else None
                if not (isinstance(arg, ast.Constant) and not str(arg.value).startswith("MASKFLEET_")):
                    found.append(f"{path.relative_to(root)}:{node.lineno} {ast.unparse(node)}")
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ" and isinstance(node.ctx, ast.Load):
            found.append(f"{path.relative_to(root)}:{node.lineno} {ast.unparse(node)}")
    return found


def test_only_the_settings_module_reads_maskfleet_variables():
    reads = [r for d in PACKAGE_DIRS for p in sorted((REPO / d).rglob("*.py")) if p.name != "settings.py" or d != "maskfleet"
             for r in _environment_reads(p)]
    assert not reads, reads


def test_the_check_sees_an_environment_read(tmp_path):
    """It can fail: the reads of the modules that had their own parsers before are reported."""
    (tmp_path / "m.py").write_text('import os\nA = os.environ.get("MASKFLEET_X")\nB = os.getenv(name)\n'
                                   'C = os.environ["MASKFLEET_Y"]\nD = os.environ.get("CUDA_VISIBLE_DEVICES")\n')
    assert [r.split(" ", 1)[1] for r in _environment_reads(tmp_path / "m.py", tmp_path)] == [
        "os.environ.get('MASKFLEET_X')", "os.getenv(name)", "os.environ['MASKFLEET_Y']"]


def test_defaults_unset_and_empty_alike_except_allowed_roots():
    assert load_settings({}) == load_settings({"MASKFLEET_LEASE_SECONDS": "", "MASKFLEET_DEVICE": "  "})
    assert load_settings({}).allowed_roots is None  # no confinement
    assert load_settings({"MASKFLEET_ALLOWED_ROOTS": ""}).allowed_roots == ""  # no local files at all


@pytest.mark.parametrize("name, value, words", [
    ("MASKFLEET_LEASE_SECONDS", "0", "must be at least 1"),
    ("MASKFLEET_MAX_JOB_SECONDS", "1.5", "expected a whole number"),
    ("MASKFLEET_WEBHOOK_DEADLINE", "soon", "expected a number"),
    ("MASKFLEET_METRICS_PORT", "70000", "must be at most 65535"),
    ("MASKFLEET_DTYPE", "float8", "expected one of float32, float16, bfloat16"),
    ("MASKFLEET_PIPELINE", "2", "expected 0 or 1"),
    ("MASKFLEET_MEMORY_LIMIT_MB", "-5", "must be positive"),
])
def test_a_bad_value_names_the_variable_its_value_and_the_rule(name, value, words):
    with pytest.raises(ValueError) as info:
        load_settings({name: value})
    assert str(info.value) == f"{name}={value!r}: {words}"


def test_batching_needs_the_pipeline():
    with pytest.raises(ValueError, match="MASKFLEET_BATCH_JOBS: batching needs the pipelined worker"):
        load_settings({"MASKFLEET_BATCH_JOBS": "2"})
    assert load_settings({"MASKFLEET_BATCH_JOBS": "2", "MASKFLEET_PIPELINE": "1"}).batch_jobs == 2


def test_choices_agree_with_the_code_that_uses_them():
    assert get_args(Settings.model_fields["batch_forward"].annotation) == FORWARDS
    assert set(get_args(Settings.model_fields["dtype"].annotation)) == set(DTYPES)


def test_the_secret_is_not_in_the_settings_repr():
    assert "whsec_c2VjcmV0" not in repr(load_settings({"MASKFLEET_WEBHOOK_SECRET": "whsec_c2VjcmV0"}))


def test_unknown_variables_are_listed():
    env = {"MASKFLEET_LEASE_SECONDS": "5", "MASKFLEET_LEASE_SECOND": "5", "MASKFLEET_MODLES": "/m", "PATH": "/bin"}
    assert unknown_variables(env) == ["MASKFLEET_LEASE_SECOND", "MASKFLEET_MODLES"]


def test_a_worker_warns_about_an_unknown_variable(monkeypatch, caplog):
    from celery.signals import celeryd_init

    import maskfleet.tasks.app  # noqa: F401  (connects the receiver)

    monkeypatch.setenv("MASKFLEET_LEASE_SECOND", "5")
    with caplog.at_level(logging.WARNING, logger="maskfleet.tasks.app"):
        celeryd_init.send(sender="test@host", conf=None, options={})
    assert any("MASKFLEET_LEASE_SECOND" in r.getMessage() for r in caplog.records), caplog.text


def test_the_docs_command_prints_the_table():
    out = subprocess.run([sys.executable, "-m", "maskfleet.settings"], capture_output=True, text=True, check=True).stdout
    assert out == settings_markdown()
