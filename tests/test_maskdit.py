"""MaskDiT (Zheng et al. 2023): the DiT's decoder and kept-token input, the masked loss of every
continuous objective, shared draws, the unmasking phase, config checks and exact resume."""

import json

import pytest
import torch

from ditkit.builders import training_objective
from ditkit.config import Config, ConfigError, DataConfig, ModelConfig, ObjectiveConfig, RunConfig, SampleConfig, TrainConfig
from ditkit.diffusion.edm import EDM
from ditkit.diffusion.flow import FlowMatching
from ditkit.diffusion.gaussian import GaussianDiffusion
from ditkit.diffusion.masking import MaskedTokenTraining, draw_kept_patches, patch_mask_pixels
from ditkit.diffusion.objective import masked_mean
from ditkit.diffusion.schedules import make_schedule
from ditkit.models.dit import DiT, forward_macs

quiet = lambda m: None  # noqa: E731


def tiny_dit(**kw) -> DiT:
    args = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=3,
                learn_sigma=False, decoder_depth=1)
    args.update(kw)
    torch.manual_seed(0)
    model = DiT(**args)
    for p in model.parameters():  # past the zero init, so every path carries signal
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def test_the_encoder_never_sees_dropped_patches_and_the_output_is_full_size():
    model = tiny_dit()
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 600.0]), torch.tensor([0, 2])
    keep = torch.tensor([[0, 3, 5, 6, 9, 10, 12, 15], [1, 2, 4, 7, 8, 11, 13, 14]])  # 8 of 16 patches each
    out = model(x, t, y, keep=keep)
    assert out.shape == x.shape
    # changing the pixels of dropped patches changes nothing: the encoder reads the kept tokens only
    visible = patch_mask_pixels(keep, grid=4, patch=2)
    assert visible.shape == (2, 1, 8, 8) and visible.sum() == 2 * 8 * 4
    x2 = torch.where(visible.bool(), x, torch.randn_like(x) * 5)
    assert torch.allclose(model(x2, t, y, keep=keep), out, atol=1e-6)
    assert not torch.allclose(model(x2, t, y), model(x, t, y))  # without masking every patch counts
    # the decoder adds its blocks to the cost; decoder_depth 0 is the plain DiT (official layout)
    plain = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=3)
    assert "mask_token" not in plain.state_dict() and not any(k.startswith("decoder") for k in plain.state_dict())
    assert forward_macs(model) > forward_macs(plain)
    with pytest.raises(ValueError, match="decoder blocks"):
        plain(x, t, y, keep=keep)


def test_kept_patches_are_distinct_sorted_and_reproducible():
    a = draw_kept_patches(4, 16, 6, torch.Generator().manual_seed(1))
    b = draw_kept_patches(4, 16, 6, torch.Generator().manual_seed(1))
    assert a.shape == (4, 6) and torch.equal(a, b)
    for row in a:
        assert row.unique().numel() == 6 and torch.equal(row, row.sort().values) and row.max() < 16
    assert torch.allclose(masked_mean(torch.tensor([[1.0, 3.0], [2.0, 4.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0]])),
                          torch.tensor([1.0, 3.0]))


@pytest.mark.parametrize("objective", [
    GaussianDiffusion(make_schedule("linear"), prediction="v", learn_sigma=False),
    FlowMatching(),
    EDM(),
], ids=["gaussian", "flow", "edm"])
def test_masked_loss_is_the_visible_loss_plus_the_weighted_reconstruction_of_the_input(objective):
    model = tiny_dit()
    x0, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])
    masked = MaskedTokenTraining(objective, mask_ratio=0.5, patch_size=2, mae_weight=0.1)
    g = torch.Generator().manual_seed(0)
    draws = masked.global_draws(x0, 3, slice(0, 3), g)
    keep = draws["keep"]
    assert keep.shape == (3, 8)
    terms = masked.loss_terms(model, x0, y, **draws)
    # by hand: the objective with its loss on the visible pixels, the network called with keep
    visible = patch_mask_pixels(keep, 4, 2)
    calls = []

    def net(x_in, t, y_):
        calls.append((x_in, t))
        return model(x_in, t, y_, keep=keep)

    given = {k: v for k, v in draws.items() if k != "keep"}
    plain = objective.loss_terms(net, x0, y, loss_mask=visible, **given)
    x_in, t_in = calls[0]  # what the network was given (x_t; c_in x_sigma for EDM) and its time input
    error = (model(x_in, t_in, y, keep=keep) - x_in) ** 2
    mae = (error * (1 - visible)).flatten(1).sum(1) / (1 - visible).flatten(1).sum(1)
    assert torch.allclose(terms["mae"], mae, atol=1e-5)
    assert torch.allclose(terms["loss"], plain["loss"] + 0.1 * mae, atol=1e-5)
    # drawing inside the loss from the same generator gives the same numbers (keep first, then the objective's)
    again = masked.loss_terms(model, x0, y, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(again["loss"], terms["loss"], atol=1e-6)
    # the unmasking phase: the plain objective
    masked.set_mask_ratio(0.0)
    assert set(masked.loss_terms(model, x0, y, **given)) == set(objective.loss_terms(model, x0, y, **given))


def _cfg(tmp_path, name, **objective) -> Config:
    return Config(
        model=ModelConfig(name="DiT-T/4", hidden_size=32, depth=2, num_heads=2, decoder_depth=1),
        objective=ObjectiveConfig(kind="gaussian", prediction="v", schedule="linear", learn_sigma=False,
                                  mask_ratio=0.5, unmask_fraction=0.5, **objective),
        data=DataConfig(dataset="shapes", image_size=16, num_items=64),
        train=TrainConfig(global_batch_size=8, max_steps=4, log_every=1, ckpt_every=2, lr=1e-3, precision="fp32",
                          device="cpu", sample_every=0, keep_last=5),
        run=RunConfig(results_dir=str(tmp_path), run_name=name, tensorboard=False),
        sample=SampleConfig(num_sampling_steps=2, num_samples=4),
    )


def test_config_checks_say_what_to_change(tmp_path):
    cfg = _cfg(tmp_path, "x")
    cfg.validate()
    for change, message in [
        (dict(mask_ratio=1.0), "mask_ratio=1.0"),
        (dict(decoder_depth=None), "set model.decoder_depth"),
        (dict(learn_sigma=True), "learned sigma"),
        (dict(pos_embed="rope"), "RoPE"),
        (dict(mask_ratio=0.0), "unmask_fraction ends token masking"),
    ]:
        bad = _cfg(tmp_path, "x")
        for key, value in change.items():
            setattr(bad.model if key in ("decoder_depth", "pos_embed") else bad.objective, key, value)
        with pytest.raises(ConfigError, match=message):
            bad.validate()
    latte = _cfg(tmp_path, "x")
    latte.model.name, latte.objective.mask_ratio, latte.objective.unmask_fraction = "Latte-T/4", 0.0, 0.0
    latte.data.dataset = "moving_digits"
    with pytest.raises(ConfigError, match="decoder_depth is a MaskDiT option"):
        latte.validate()
    cfg.data.channels, cfg.data.num_classes = 3, 4
    assert isinstance(training_objective(cfg), MaskedTokenTraining)


def test_training_masks_then_unmasks_and_resumes_exactly(tmp_path):
    from ditkit.train.loop import train

    logs = []
    whole = train(_cfg(tmp_path, "whole"), log=logs.append)
    assert any("step 2: unmasking phase" in line for line in logs)
    metrics = [json.loads(line) for line in (whole.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]
    train(_cfg(tmp_path, "split"), log=quiet, stop_at_step=2)
    resumed_logs = []
    from ditkit.train.loop import train as train_again

    resumed = train_again(_cfg(tmp_path, "split"), resume=str(tmp_path / "split"), log=resumed_logs.append)
    assert any("step 2: unmasking phase" in line for line in resumed_logs)  # set at the start of the resumed session
    from safetensors.torch import load_file

    a = load_file(whole.run_dir / "checkpoints" / "step_0000004" / "model.safetensors")
    b = load_file(resumed.run_dir / "checkpoints" / "step_0000004" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # sampling never masks: the pipeline draws full images from the decoder model
    import ditkit

    out = ditkit.load(whole.run_dir, device="cpu")(class_labels=[0, 1], num_inference_steps=2)
    assert out.tensors.shape == (2, 3, 16, 16)


def test_a_maskdit_model_is_refused_by_the_diffusers_export_and_rebuilt_whole():
    from ditkit.interop.common import InteropError, dit_kwargs
    from ditkit.interop.diffusers_format import diffusers_config

    model = tiny_dit()
    assert dit_kwargs(model)["decoder_depth"] == 1
    assert len(DiT(**dit_kwargs(model)).decoder_blocks) == 1  # the architecture rebuilds with its decoder
    with pytest.raises(InteropError, match="MaskDiT decoder block"):
        diffusers_config(model)
