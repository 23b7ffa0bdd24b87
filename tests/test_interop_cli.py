"""The interop commands end to end: ``import-dit`` writes a standard run that ``sample`` and ``info``
read, its recorded settings follow the official DiT sampling algorithm (checked against a
re-implementation of that algorithm written here from its published description), and
``export-diffusers`` writes folders diffusers loads."""

import argparse
import json
import math

import numpy as np
import pytest
import torch

from ditkit.cli import main
from ditkit.config import load_config
from ditkit.models.dit import build_dit
import ditkit

LATENT, CLASSES = 8, 10  # a DiT-T/2 on a 64 px image: 8x8x4 latents, 10 classes


def official_style_state_dict(seed: int = 0) -> dict:
    """Official key names and shapes (ditkit's DiT uses them), every weight random so that adaLN,
    the final layer and the variance channels all matter."""
    torch.manual_seed(seed)
    model = build_dit("DiT-T/2", input_size=LATENT, in_channels=4, num_classes=CLASSES, learn_sigma=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0.0, 0.08)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("import")
    torch.save({"ema": official_style_state_dict(), "model": official_style_state_dict(1),
                "args": argparse.Namespace(model="DiT-T/2", image_size=64)}, root / "ckpt.pt")
    run = root / "run"
    assert main(["import-dit", str(root / "ckpt.pt"), "--model", "DiT-T/2", "--image-size", "64", "--out", str(run)]) == 0
    return run


def test_import_dit_writes_a_standard_run_with_the_official_settings(imported, capsys):
    step = imported / "checkpoints" / "step_0000000"
    assert sorted(p.name for p in step.iterdir()) == ["config.json", "ema.safetensors", "model.safetensors"]
    cfg = load_config(imported)
    assert cfg.model.name == "DiT-T/2" and cfg.model.timestep_freq_shift == 0.0
    o, d, s = cfg.objective, cfg.data, cfg.sample
    assert (o.kind, o.prediction, o.schedule, o.learn_sigma, o.clip_x0) == ("gaussian", "eps", "linear", True, 0.0)
    assert (d.image_size, d.latent_channels, d.vae_downsample, d.num_classes, d.vae) == (64, 4, 8, CLASSES, None)
    assert (s.sampler, s.num_sampling_steps, s.guide_channels, s.timestep_spacing) == ("ddpm", 250, 3, "uniform")
    assert main(["info", str(imported)]) == 0
    out = capsys.readouterr().out
    assert "DiT-T/2" in out and "10 classes" in out and "step         0" in out
    with pytest.raises(Exception, match="cannot be resumed"):  # weights only: no optimiser state
        from ditkit.train.checkpoint import load_training_state

        load_training_state(step)


def test_sample_without_a_vae_writes_latents_and_says_so(imported, tmp_path, capsys):
    out = tmp_path / "s"
    code = main(["sample", "--ckpt", str(imported), "--num-samples", "3", "--num-sampling-steps", "4", "--out-dir", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "No VAE" in text and "--vae" in text
    with np.load(out / "latents.npz") as npz:
        assert npz["arr_0"].shape == (3, 4, LATENT, LATENT) and npz["arr_1"].tolist() == [0, 1, 2]
    assert not list(out.glob("*.png"))


def test_a_pixel_model_refuses_a_vae(tmp_path, capsys):
    assert main(["train", "--recipe", "shapes_tiny", "--max-steps", "1", "--results-dir", str(tmp_path), "--run-name", "p"]) == 0
    assert main(["sample", "--ckpt", str(tmp_path / "p"), "--vae", str(tmp_path), "--num-samples", "1"]) == 2
    assert "pixel-space model" in capsys.readouterr().err


# ---- the official sampling algorithm, written out from the DiT / improved-DDPM description ------------


def official_ddpm_250(model, z, y, cfg_scale, generators, clip=False, guided=3):
    """facebookresearch/DiT sample.py: linear betas 1e-4..0.02 over 1000 steps, respaced to 250 by
    the rounded-stride rule, learned-range variance, eps prediction, x0 NOT clipped, guidance on the
    first 3 of the 4 latent eps channels (forward_with_cfg), ancestral steps with noise at t > 0."""
    T, n = 1000, 250
    betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)
    base_abar = np.cumprod(1.0 - betas)
    stride, pos, use = (T - 1) / (n - 1), 0.0, []
    for _ in range(n):
        use.append(round(pos))
        pos += stride
    use = sorted(set(use))
    spaced_betas, last = [], 1.0
    for i, a in enumerate(base_abar):
        if i in use:
            spaced_betas.append(1 - a / last)
            last = a
    b = np.array(spaced_betas)
    abar = np.cumprod(1 - b)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = b * (1 - abar_prev) / (1 - abar)
    post_logvar = np.log(np.append(post_var[1], post_var[1:]))
    coef1 = b * np.sqrt(abar_prev) / (1 - abar)
    coef2 = (1 - abar_prev) * np.sqrt(1 - b) / (1 - abar)

    def f(arr, i):
        return torch.tensor(arr[i], dtype=torch.float32)

    x = z.clone()
    null = torch.full_like(y, CLASSES)
    with torch.no_grad():
        for i in reversed(range(n)):
            t = torch.full((len(x),), use[i], dtype=torch.float32)
            out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
            cond, uncond = out.chunk(2)
            eps = torch.cat([uncond[:, :guided] + cfg_scale * (cond[:, :guided] - uncond[:, :guided]), cond[:, guided:4]], 1)
            v = cond[:, 4:]
            x0 = math.sqrt(1 / abar[i]) * x - math.sqrt(1 / abar[i] - 1) * eps
            if clip:
                x0 = x0.clamp(-1, 1)
            mean = f(coef1, i) * x0 + f(coef2, i) * x
            frac = (v + 1) / 2
            logvar = frac * f(np.log(b), i) + (1 - frac) * f(post_logvar, i)
            noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators])
            x = mean + (float(i != 0)) * torch.exp(0.5 * logvar) * noise
    return x


def test_sampling_an_imported_model_follows_the_official_algorithm(imported):
    labels, seed, scale = [1, 7], 3, 4.0
    pipe = ditkit.load(imported, device="cpu")
    ours = pipe(class_labels=labels, seed=seed)  # recorded defaults: DDPM 250, cfg 4
    assert ours.is_latent and ours.metadata["num_sampling_steps"] == "250" and ours.metadata["timestep_spacing"] == "uniform"
    model = pipe.model
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(labels))]
    z = torch.stack([torch.randn(4, LATENT, LATENT, generator=g) for g in gens])
    ref = official_ddpm_250(model, z, torch.tensor(labels), scale, gens)
    torch.testing.assert_close(ours.tensors, ref, atol=2e-4, rtol=1e-4)
    # the control: the same algorithm with x0 clipped to [-1, 1] (ADM pixel sampling) gives other samples
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(labels))]
    z = torch.stack([torch.randn(4, LATENT, LATENT, generator=g) for g in gens])
    clipped = official_ddpm_250(model, z, torch.tensor(labels), scale, gens, clip=True)
    assert (clipped - ours.tensors).abs().max() > 1e-2


def test_export_diffusers_writes_a_transformer_and_a_pipeline(imported, tmp_path, capsys):
    diffusers = pytest.importorskip("diffusers")
    # an official-convention model (timestep_freq_shift 0): lossy in diffusers, so refused without --allow-lossy
    assert main(["export-diffusers", str(imported), str(tmp_path / "t")]) == 2
    assert "--allow-lossy" in capsys.readouterr().err and not (tmp_path / "t").exists()
    assert main(["export-diffusers", str(imported), str(tmp_path / "t"), "--allow-lossy"]) == 0
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    assert config["out_channels"] == 8 and config["sample_size"] == LATENT and config["norm_eps"] == 1e-6
    transformer = diffusers.DiTTransformer2DModel.from_pretrained(str(tmp_path / "t"))
    assert transformer.config.num_layers == 4

    from test_latent_train import save_tiny_vae  # noqa: PLC0415 (a tiny random AutoencoderKL)

    vae = save_tiny_vae(tmp_path / "vae")
    assert main(["export-diffusers", str(imported), str(tmp_path / "p"), "--vae", str(vae), "--allow-lossy"]) == 0
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline" and (tmp_path / "p" / "vae" / "config.json").is_file()
    assert "DiTPipeline" in capsys.readouterr().out
