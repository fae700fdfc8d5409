"""The README and docs/ match the code: generated pages are current and links lead somewhere
(test_readme_fleet.py runs the README's quick-start commands)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from maskfleet.job import fields_markdown

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def test_docs_job_md_is_generated_from_the_job_model():
    assert (REPO / "docs" / "job.md").read_text() == fields_markdown(), \
        "docs/job.md is stale: maskfleet schema --markdown > docs/job.md"


@pytest.mark.parametrize("page", [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_relative_links_lead_to_files(page):
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
        assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_readme_names_only_existing_paths():
    for path in re.findall(r"`((?:docs|deploy|tests|bench|sampling|storage|tasks|worker|maskfleet)/[\w./-]*)`", README):
        assert (REPO / path).exists(), f"README names {path}, which does not exist"

