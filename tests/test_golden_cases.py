"""Every golden case through `maskfleet run`: our latent equals the original node's to 1e-4.

All cases of a mode go through one `maskfleet run` (it takes several jobs and loads each
model once), so the suite pays the process start twice, not once per case.

SD1.5-style (`c*`), v-prediction and SDXL-style (`p*`) cases; each case's model folder is
the one its case.json names (`tiny_unet`, `tiny_unet_v`, `tiny_unet_xl`).

Mode "comfy" is checked against `out_intended`: the original loop run in real ComfyUI
with its string flags replaced by the booleans it meant (see shared/golden/README.md).
Mode "regional" is checked against `out_head_node`: the node as Impact Pack ships it
today (RegionalSampler based). Where a case also stores the `_hw_fixed` key (a non-square
latent), that is the reference: we resize the mask in the right orientation, which the
node does not.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from golden_jobs import golden_case_dirs, make_models_dir, write_case_job

REL_L2_TOLERANCE = 1e-4
REFERENCE = {"comfy": "out_intended", "regional": "out_head_node"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """mode -> (case id -> (job path, case, tensors), result by job id, stderr): every case of the
    mode through one `maskfleet run` (a job after another, each model loaded once)."""
    done: dict[str, tuple] = {}

    def run(mode: str) -> tuple:
        if mode not in done:
            root = tmp_path_factory.mktemp(f"golden-{mode}")
            models = make_models_dir(root, every_golden_model=True)
            cases = {d.name: write_case_job(d, root / d.name, mode=mode) for d in golden_case_dirs()}
            proc = subprocess.run(
                [sys.executable, "-m", "maskfleet.cli", "run", *(str(job) for job, _, _ in cases.values()),
                 "--models", str(models), "--device", "cpu", "--quiet"],
                capture_output=True, text=True, timeout=1200,
            )
            results = {r["job_id"]: r for r in map(json.loads, proc.stdout.splitlines())}
            done[mode] = ({case["id"]: (job, case, tensors) for job, case, tensors in cases.values()}, results, proc.stderr)
        return done[mode]

    return run


@pytest.mark.parametrize("mode", sorted(REFERENCE))
@pytest.mark.parametrize("case_dir", golden_case_dirs(), ids=lambda d: d.name)
def test_golden_case_matches_original_node(case_dir, mode, runs):
    cases, results, stderr = runs(mode)
    case_id = json.loads((case_dir / "case.json").read_text())["id"]
    job_path, case, tensors = cases[case_id]
    assert case_id in results, stderr
    assert results[case_id]["shape"] == case["latent_shape"]

    out = load_file(job_path.parent / "out.latent")["latent_tensor"]
    ref = tensors.get(f"{REFERENCE[mode]}_hw_fixed", tensors[REFERENCE[mode]])
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    rel = ((out - ref).norm() / ref.norm()).item()
    print(f"\n{case['id']} ({mode}): relative L2 error {rel:.2e} (model {case.get('model', {}).get('diffusers_dir', 'tiny_unet')})")
    assert rel <= REL_L2_TOLERANCE, f"{case['id']} ({mode}): relative L2 error {rel:.3e}"
