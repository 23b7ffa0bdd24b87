"""The pipelines (issue 13): ditkit.load, the diffusers-style call, outputs unchanged from before the
refactor for the same seeds (tests/fixtures/outputs was drawn by the pre-pipeline code), the
training-time sample hook, the CLI going through them, and honest metadata."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import ditkit
from ditkit.config import ConfigError
from ditkit.pipelines.image import ImagePipeline, ImagePipelineOutput
from ditkit.pipelines.text import TextPipeline, TextPipelineOutput

FIXTURES = Path(__file__).parent / "fixtures" / "outputs"


@pytest.fixture(scope="module")
def image_samples():
    return np.load(FIXTURES / "image_samples.npz")


def test_load_returns_the_pipeline_of_the_modality():
    assert isinstance(ditkit.load(FIXTURES / "image_ckpt", device="cpu"), ImagePipeline)
    assert isinstance(ditkit.load(FIXTURES / "text_ckpt", device="cpu"), TextPipeline)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_image_outputs_unchanged_for_the_same_seeds(image_samples, sampler):
    pipe = ditkit.load(FIXTURES / "image_ckpt", device="cpu")
    out = pipe(class_labels=[0, 1, 2, 3], num_samples=4, sampler=sampler, num_inference_steps=5, guidance_scale=2.0, seed=3)
    assert isinstance(out, ImagePipelineOutput)
    np.testing.assert_allclose(out.tensors.numpy(), image_samples[sampler], atol=2e-5)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_flow_outputs_unchanged_for_the_same_seeds(image_samples, sampler):
    pipe = ditkit.load(FIXTURES / "flow_ckpt", device="cpu")
    out = pipe(class_labels=[0, 1, 2, 3], num_samples=4, sampler=sampler, num_inference_steps=4, guidance_scale=1.5, seed=5)
    np.testing.assert_allclose(out.tensors.numpy(), image_samples["flow-" + sampler], atol=2e-5)


def test_text_outputs_unchanged_for_the_same_seeds():
    recorded = json.loads((FIXTURES / "text_samples.json").read_text())
    pipe = ditkit.load(FIXTURES / "text_ckpt", device="cpu")
    out = pipe("12+", num_inference_steps=8, num_samples=4, seed=7)
    assert isinstance(out, TextPipelineOutput)
    assert out.tokens.tolist() == recorded["prompt"]
    out = pipe(infill="3+4=__", num_inference_steps=8, num_samples=4, seed=7)
    assert out.tokens.tolist() == recorded["infill"]


def test_generator_arguments_follow_diffusers():
    pipe = ditkit.load(FIXTURES / "image_ckpt", device="cpu")
    kwargs = dict(class_labels=[1, 2], num_inference_steps=3, guidance_scale=1.0, sampler="ddim")
    a = pipe(**kwargs, generator=torch.Generator().manual_seed(0))
    b = pipe(**kwargs, generator=torch.Generator().manual_seed(0))
    c = pipe(**kwargs, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.tensors, b.tensors) and not torch.equal(a.tensors, c.tensors)
    assert a.seeds is None and a.metadata["seed"] == "caller's generator"
    # a list of generators seeded like the default seeds gives the default samples
    listed = pipe(**kwargs, generator=[torch.Generator().manual_seed(s) for s in (10, 11)])
    seeded = pipe(**kwargs, seed=10)
    assert torch.allclose(listed.tensors, seeded.tensors, atol=1e-6)
    with pytest.raises(ConfigError, match="one per sample"):
        pipe(**kwargs, generator=[torch.Generator()])
    assert len(a.images) == 2 and a.images[0].size == (16, 16)


def test_class_names_and_labels_by_name(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "image_ckpt", run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["data"]["class_names"] = ["circle", "square", "triangle", "star"]
    (run / "config.json").write_text(json.dumps(cfg))
    pipe = ditkit.load(run, device="cpu")
    out = pipe(class_labels=["square", "Star"], num_inference_steps=2, guidance_scale=1.0)
    assert out.labels == [1, 3] and out.sample_metadata(1)["class_name"] == "star"
    with pytest.raises(ConfigError, match="not a class of this model; use one of circle, square"):
        pipe(class_labels=["hexagon"], num_inference_steps=2)


def test_metadata_names_the_weights_really_used(tmp_path):
    run = tmp_path / "step_0000004"
    shutil.copytree(FIXTURES / "image_ckpt", run)
    assert ditkit.load(run, device="cpu").weights == "ema"
    (run / "ema.safetensors").unlink()  # e.g. an imported checkpoint: raw weights only
    pipe = ditkit.load(run, device="cpu")
    out = pipe(class_labels=[0], num_inference_steps=2, guidance_scale=1.0)
    assert pipe.weights == "model" and out.metadata["weights"] == "model"


def test_guidance_refused_when_the_unconditional_branch_was_never_trained(tmp_path):
    run = tmp_path / "step_0000004"
    shutil.copytree(FIXTURES / "image_ckpt", run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["model"]["class_dropout_prob"] = 0.0
    (run / "config.json").write_text(json.dumps(cfg))
    pipe = ditkit.load(run, device="cpu")
    with pytest.raises(ConfigError, match="never trained.*--cfg-scale 1"):
        pipe(class_labels=[0], num_inference_steps=2, guidance_scale=4.0)
    pipe(class_labels=[0], num_inference_steps=2, guidance_scale=1.0)  # no guidance: fine
    with pytest.warns(UserWarning, match="never trained"):
        pipe(class_labels=[0], num_inference_steps=2, guidance_scale=4.0, allow_untrained_uncond=True)


def test_sampler_that_does_not_fit_the_objective_is_refused():
    pipe = ditkit.load(FIXTURES / "image_ckpt", device="cpu")
    with pytest.raises(ConfigError, match="--sampler heun does not fit a gaussian model: use one of ddpm"):
        pipe(class_labels=[0], sampler="heun", num_inference_steps=2)
    flow = ditkit.load(FIXTURES / "flow_ckpt", device="cpu")
    with pytest.raises(ConfigError, match="--timestep-spacing applies to gaussian samplers"):
        flow(class_labels=[0], num_inference_steps=2, timestep_spacing="quadratic")


def test_training_sample_hook_writes_a_grid_and_keeps_the_rng(tmp_path):
    from ditkit.pipelines import write_training_samples

    pipe = ditkit.load(FIXTURES / "image_ckpt", device="cpu")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    path = write_training_samples(pipe.model, pipe.cfg, tmp_path / "step_0000004", device=torch.device("cpu"),
                                  dtype=torch.float32, vae=None)
    assert path.suffix == ".png" and path.is_file()
    assert torch.equal(torch.get_rng_state(), before)
    text = ditkit.load(FIXTURES / "text_ckpt", device="cpu")
    path = write_training_samples(text.model, text.cfg, tmp_path / "t", device=torch.device("cpu"),
                                  dtype=torch.float32, tokenizer=text.tokenizer)
    assert path.suffix == ".txt" and "sample 0" in path.read_text()
