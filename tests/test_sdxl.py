"""SDXL-style models: the pooled embedding and size ids travel packed with the prompt embeddings.

The golden cases p03/p04 (tests/test_golden_cases.py) check the whole job against ComfyUI;
these check the pieces: the packing, the UNet call it unpacks into, and batches of jobs
whose rows carry different pooled vectors.
"""
from __future__ import annotations

import pytest
import torch

from golden_jobs import IN_REPO_GOLDEN
from maskfleet.model_dirs import load_unet_denoiser, unet_inputs
from maskfleet.sampling import AdvancedSampler, SamplingJob, sample_job
from maskfleet.sampling.job_batch import sample_job_batch
from maskfleet.sampling.sdxl_conditioning import default_size_ids, extra_rows, pack, unpack

XL = IN_REPO_GOLDEN / "tiny_unet_xl"
CONTEXT, POOLED = 32, 48


@pytest.fixture(scope="module")
def xl():
    return load_unet_denoiser(XL)


@pytest.mark.parametrize("width, pooled", [(32, 48), (2048, 1280), (8, 3)])
def test_pack_and_unpack_give_back_every_part(width, pooled):
    g = torch.Generator().manual_seed(0)
    tokens, vec = torch.randn(2, 5, width, generator=g), torch.randn(2, pooled, generator=g)
    packed = pack(tokens, vec, (1024, 768, 16, 8, 1024, 768))
    assert packed.shape == (2, 5 + extra_rows(pooled, width), width)
    got_tokens, got_pooled, ids = unpack(packed, pooled)
    assert torch.equal(got_tokens, tokens) and torch.equal(got_pooled, vec)
    assert ids.tolist() == [[1024, 768, 16, 8, 1024, 768]] * 2


def test_size_ids_follow_comfyui_for_a_plain_text_encode():
    assert default_size_ids(32, 48) == (256, 384, 0, 0, 256, 384)


def test_the_config_tells_the_pooled_width_and_latent_space():
    takes = unet_inputs(XL)
    assert (takes.context_width, takes.pooled_width, takes.latent_scale) == (CONTEXT, POOLED, 0.13025)
    assert unet_inputs(IN_REPO_GOLDEN / "tiny_unet").pooled_width is None


def test_denoise_is_the_unet_called_with_added_conditioning(xl):
    g = torch.Generator().manual_seed(1)
    x, sigma = torch.randn(2, 4, 16, 16, generator=g), torch.tensor(3.0)
    tokens, vec = torch.randn(2, 77, CONTEXT, generator=g), torch.randn(2, POOLED, generator=g)
    ids = default_size_ids(16, 16)
    got = xl.denoise(x, sigma, pack(tokens, vec, ids))
    t = xl.schedule.timestep(sigma).float().expand(2)
    eps = xl.unet(x / (sigma**2 + 1) ** 0.5, t, encoder_hidden_states=tokens,
                  added_cond_kwargs={"text_embeds": vec, "time_ids": torch.tensor([ids] * 2, dtype=torch.float32)}).sample
    torch.testing.assert_close(got, x - eps * sigma, rtol=0, atol=0)
    other = xl.denoise(x, sigma, pack(tokens, vec * 2, ids))  # the pooled vector reaches the model
    assert not torch.equal(got, other)


def _xl_jobs(den, n: int) -> list[SamplingJob]:
    g = torch.Generator().manual_seed(5)
    jobs = []
    for i in range(n):
        def cond():
            return pack(torch.randn(1, 77, CONTEXT, generator=g), torch.randn(1, POOLED, generator=g), default_size_ids(16, 16))
        mask = torch.zeros(1, 128, 128)
        mask[:, 32 + 8 * i:96, 40:100] = 1.0
        jobs.append(SamplingJob.of(torch.randn(1, 4, 16, 16, generator=g) * 4, mask,
                                   AdvancedSampler(den, 7.0, "euler", "karras", cond(), cond()),
                                   AdvancedSampler(den, 4.0, "euler", "karras", cond(), cond()),
                                   seed=10 + i, steps=3, overlap_factor=3))
    return jobs


def test_a_batch_of_sdxl_jobs_gives_each_its_own_result(xl):
    """Each job's rows keep their own pooled vectors and size ids in a batch: per_job bitwise,
    fused within float rounding (relative L2) (the added embedding's rows differ, so no shared-rows trick)."""
    jobs = _xl_jobs(xl, 3)
    alone = [sample_job(job) for job in jobs]
    for out, ref in zip(sample_job_batch(jobs, forward="per_job"), alone):
        assert torch.equal(out, ref)
    for out, ref in zip(sample_job_batch(jobs, forward="fused"), alone):
        rel = ((out - ref).norm() / ref.norm()).item()
        assert rel < 1e-5, rel  # the golden tolerance is 1e-4


def test_size_ids_given_by_name_fill_in_the_rest_by_the_plain_rule():
    from maskfleet.sampling.sdxl_conditioning import size_ids

    assert size_ids(32, 48, {"width": 1024, "crop_h": 8}) == (256, 1024, 8, 0, 256, 1024)
    assert size_ids(32, 48, {"target_height": 512}) == (256, 384, 0, 0, 512, 384)


def test_size_ids_reach_the_model(tmp_path):
    """The golden SDXL case with its plain ids given explicitly is bitwise the case; other ids change it."""
    import json

    from safetensors.torch import load_file, save_file

    from golden_jobs import make_models_dir, write_case_job
    from maskfleet.job import parse_job
    from maskfleet.job_pipeline import RunOptions, run_job

    job_path, _, _ = write_case_job(IN_REPO_GOLDEN / "cases" / "p03_sdxl_euler_karras_o3", tmp_path / "job")
    models = make_models_dir(tmp_path, every_golden_model=True)
    options = RunOptions(models_root=str(models), device="cpu")
    job = json.loads(job_path.read_text())
    outs = {}
    for name, ids in (("plain", None), ("same", [256.0, 256.0, 0.0, 0.0, 256.0, 256.0]), ("other", [1024.0, 768.0, 0.0, 0.0, 1024.0, 768.0])):
        doc = json.loads(json.dumps(job))
        if ids is not None:
            cond = load_file(job["base_sampler"]["positive"].removeprefix("file://"))
            path = tmp_path / f"pos-{name}.safetensors"
            save_file({**cond, "add_time_ids": torch.tensor(ids)}, path)
            doc["base_sampler"]["positive"] = path.as_uri()
        doc["output"] = (tmp_path / f"{name}.latent").as_uri()
        run_job(parse_job(doc), options)
        outs[name] = load_file(tmp_path / f"{name}.latent")["latent_tensor"]
    assert torch.equal(outs["plain"], outs["same"])
    assert not torch.equal(outs["plain"], outs["other"])
