"""The layout's promises that code review alone would let slip: `sampling/` is a plain tensor library.

It opens no files and imports nothing of the fleet (Celery, Redis, S3, HTTP) or of the
filesystem (pathlib, os, json): model directories are read by maskfleet/model_dirs.py.
Checked on the source's syntax tree, so a comment or a docstring does not count.
"""
from __future__ import annotations

import ast
from pathlib import Path

SAMPLING = Path(__file__).resolve().parent.parent / "sampling"
FOREIGN_MODULES = {"os", "pathlib", "json", "io", "shutil", "celery", "kombu", "redis", "boto3", "botocore",
                   "urllib", "requests", "safetensors", "PIL", "maskfleet"}
FILE_CALLS = {"open", "read_text", "read_bytes", "write_text", "write_bytes", "from_pretrained", "load_file", "save_file"}


def _violations(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in FOREIGN_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] in FOREIGN_MODULES:
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name in FILE_CALLS:
                found.append(f"{name}(...) at line {node.lineno}")
    return found


def test_sampling_opens_no_files_and_imports_no_fleet_module():
    sources = sorted(SAMPLING.glob("*.py"))
    assert len(sources) > 10
    found = {p.name: v for p in sources if (v := _violations(p))}
    assert not found, found


def test_the_check_sees_a_file_read(tmp_path):
    """It can fail: a module that reads a config is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("import json\nfrom pathlib import Path\n\ndef f(d):\n    return json.loads((Path(d) / 'c.json').read_text())\n")
    assert _violations(bad) == ["import json", "from pathlib import ...", "read_text(...) at line 5"]
