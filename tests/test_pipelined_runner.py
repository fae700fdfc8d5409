"""JobPipeline with a model lane, in process: jobs from several threads, batched across jobs or not.

What the pipelined worker does with each job, minus Celery: prepare in the job's thread,
sample in the lane (batched when the jobs agree), write in the job's thread. Either batch
forward gives each job the bits of its unbatched run here: `per_job` by construction,
`fused` (one forward for the whole batch) because these jobs have equal latent batches
(sampling/job_batch.py).
"""
from __future__ import annotations

import threading
import time
from functools import partial

import pytest
import torch
from golden_jobs import make_models_dir
from safetensors.torch import load_file
from tiny_jobs import job_from, output_path, write_tiny_inputs

from maskfleet.job import parse_job
from maskfleet.job_pipeline import JobPipeline, RunOptions
from maskfleet.model_lane import ModelLane
from maskfleet.prepared_job import sample_batch

SEEDS = (3, 4, 5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelined-runner")
    template = write_tiny_inputs(root / "inputs", size=16)
    template["steps"] = 3
    template["base_sampler"]["sampler_name"] = "euler_ancestral"  # each job's own noise stream matters
    options = RunOptions(str(make_models_dir(root)), "cpu")
    alone = JobPipeline(options)
    reference = {}
    for seed in SEEDS:
        job = job_from(template, f"alone-{seed}", root / f"alone-{seed}.latent", seed=seed)
        alone.run(parse_job(job))
        reference[seed] = load_file(output_path(job))["latent_tensor"]
    return {"root": root, "template": template, "runner": alone, "reference": reference}


def run_concurrently(setup, forward: str, name: str, **changes) -> tuple[dict, ModelLane]:
    lane = ModelLane(partial(sample_batch, forward=forward), max_batch=len(SEEDS), linger=30)
    runner = setup["runner"]  # its models stay loaded; this test's lane is put in for the run
    runner.lane = lane
    jobs = {seed: job_from(setup["template"], f"{name}-{seed}", setup["root"] / f"{name}-{seed}.latent",
                           seed=seed, **changes) for seed in SEEDS}
    errors = []

    def one(job):
        try:
            runner.run(parse_job(job))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(job,)) for job in jobs.values()]
    with lane.expecting():  # as if one more job were on its way: the lane waits until every thread's job is in
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while lane.received < len(jobs) and not errors and time.monotonic() < deadline:
            time.sleep(0.01)
    for t in threads:
        t.join(120)
    runner.lane = None
    assert not errors, errors
    return {seed: load_file(output_path(job))["latent_tensor"] for seed, job in jobs.items()}, lane


@pytest.mark.parametrize("forward", ["fused", "per_job"])
def test_a_batch_is_bitwise_the_jobs_run_alone(setup, forward):
    outputs, lane = run_concurrently(setup, forward, forward)
    assert list(lane.batches) == [len(SEEDS)]  # the lane waited for every thread's job and ran them together
    for seed in SEEDS:
        assert torch.equal(outputs[seed], setup["reference"][seed]), seed
    assert not torch.equal(outputs[SEEDS[0]], outputs[SEEDS[1]])  # each job kept its own seed


def test_jobs_with_a_cropped_mask_sampler_run_alone(setup):
    _, lane = run_concurrently(setup, "fused", "cropped", crop_margin=2)
    assert list(lane.batches) == [1, 1, 1]
