"""Control and trust through the pipelines and the CLI (issue 20): inpainting, outpainting and
image-to-image on a trained fixture model, guidance maps, trajectories with x_t, C2PA signing with
`ditkit credentials init` / `ditkit verify`, and the safety blocklist in `ditkit sample`."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ditkit
from ditkit.cli import main
from ditkit.config import ConfigError

FIXTURES = Path(__file__).parent / "fixtures" / "outputs"
IMAGE_RUN = FIXTURES / "image_ckpt"  # DiT-T/4, 16x16 RGB, 4 classes, gaussian with learned sigma
TEXT_RUN = FIXTURES / "text_ckpt"


@pytest.fixture(scope="module")
def pipe():
    return ditkit.load(IMAGE_RUN, device="cpu")


@pytest.fixture(scope="module")
def original(pipe):
    return pipe(class_labels=[0, 1], num_inference_steps=4, guidance_scale=1.0, seed=0).tensors  # (2, 3, 16, 16)


def half_mask(n: int = 2) -> torch.Tensor:
    mask = torch.zeros(n, 1, 16, 16)
    mask[..., :, 8:] = 1  # regenerate the right half
    return mask


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++"])
def test_inpainting_keeps_the_known_region_exactly(pipe, original, sampler):
    out = pipe(class_labels=[2, 3], num_inference_steps=6, guidance_scale=2.0, seed=5, sampler=sampler,
               image=original, mask_image=half_mask())
    keep = half_mask() == 0
    assert torch.equal(out.tensors.masked_select(keep.expand_as(out.tensors)),
                       original.masked_select(keep.expand_as(original)))
    assert not torch.allclose(out.tensors[..., 8:], original[..., 8:], atol=1e-3)  # the rest is new
    assert out.metadata["control"] == "inpainting"


def test_strength_one_is_plain_sampling_and_a_tiny_strength_returns_the_input(pipe, original):
    kwargs = dict(class_labels=[0, 1], num_inference_steps=6, guidance_scale=1.5, seed=7, sampler="ddim")
    plain = pipe(**kwargs).tensors
    full = pipe(**kwargs, image=original, strength=1.0).tensors
    torch.testing.assert_close(full, plain)
    tiny = pipe(**kwargs, image=original, strength=0.05).tensors
    torch.testing.assert_close(tiny, original)
    half = pipe(**kwargs, image=original, strength=0.5).tensors
    # half the steps from the noised input: closer to the input than a fresh sample is
    assert (half - original).abs().mean() < (plain - original).abs().mean()


def test_outpainting_regenerates_the_border(pipe, original):
    out = pipe(class_labels=[0, 1], num_inference_steps=4, guidance_scale=1.0, seed=1, image=original, extend="left=4,top=4")
    inner = torch.nn.functional.interpolate(original, size=(12, 12), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(out.tensors[..., 4:, 4:], inner.clamp(-1, 1))
    with pytest.raises(ConfigError, match="--extend leaves"):
        pipe(class_labels=[0], num_inference_steps=2, image=original[:1], extend="left=16")


def test_bad_control_input_is_one_line_errors(pipe, original, tmp_path):
    with pytest.raises(ConfigError, match="give --init-image too"):
        pipe(class_labels=[0], num_inference_steps=2, mask_image=half_mask(1))
    with pytest.raises(ConfigError, match="outside \\(0, 1\\]"):
        pipe(class_labels=[0], num_inference_steps=2, image=original[:1], strength=1.5)
    with pytest.raises(ConfigError, match="all white"):
        pipe(class_labels=[0], num_inference_steps=2, image=original[:1], mask_image=torch.ones(1, 1, 16, 16))
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(big)
    with pytest.raises(ConfigError, match="32x32, the model draws 16x16"):
        pipe(class_labels=[0], num_inference_steps=2, image=original[:1], mask_image=str(big), strict=True)
    soft = torch.full((1, 1, 16, 16), 0.3)
    soft[..., 8:] = 0.7
    with pytest.warns(UserWarning, match="not binary: thresholded at 0.5"):
        pipe(class_labels=[0], num_inference_steps=2, image=original[:1], mask_image=soft)
    with pytest.raises(ConfigError, match="no such file"):
        pipe(class_labels=[0], num_inference_steps=2, image=str(tmp_path / "missing.png"))


def test_guidance_map_and_trajectory_with_noisy_states(pipe, tmp_path):
    out = pipe(class_labels=[0, 3], num_inference_steps=4, guidance_scale=4.0, seed=2, guidance_map=True, trajectory_points=3)
    assert out.guidance_maps.shape == (2, 1, 16, 16)
    assert float(out.guidance_maps.amax()) == pytest.approx(1.0) and float(out.guidance_maps.amin()) >= 0
    assert out.trajectory.shape == out.trajectory_xt.shape == (2, 3, 3, 16, 16)
    assert not torch.allclose(out.trajectory, out.trajectory_xt)  # x0 predictions differ from the noisy states
    written = out.save(tmp_path)
    assert tmp_path / "guidance_map.png" in written
    with Image.open(tmp_path / "trajectory.png") as im:
        assert "noisy x_t" in im.text["layout"]
    plain = pipe(class_labels=[0], num_inference_steps=2, guidance_scale=1.0, guidance_map=True)
    assert plain.guidance_maps is None  # no guidance, no map


def test_cli_image_to_image_and_inpainting_files(tmp_path, original, capsys):
    src, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.fromarray(((original[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)).save(src)
    Image.fromarray((half_mask(1)[0, 0].numpy() * 255).astype(np.uint8)).save(mask)
    out = tmp_path / "inpainted"
    assert main(["sample", "--ckpt", str(IMAGE_RUN), "--class-labels", "1", "--num-sampling-steps", "4",
                 "--init-image", str(src), "--mask", str(mask), "--out-dir", str(out)]) == 0
    with Image.open(out / "000000.png") as im:
        result = np.asarray(im)
        assert im.text["control"] == "inpainting"
    assert np.array_equal(result[:, :8], np.asarray(Image.open(src))[:, :8])  # the kept half, byte for byte
    assert main(["sample", "--ckpt", str(TEXT_RUN), "--init-image", str(src), "--out-dir", str(tmp_path / "t")]) == 2
    assert "--init-image is for image models" in capsys.readouterr().err


def test_c2pa_credentials_sign_and_verify_through_the_cli(tmp_path, capsys):
    pytest.importorskip("c2pa")
    keys = tmp_path / "keys"
    assert main(["credentials", "init", str(keys)]) == 0
    printed = capsys.readouterr().out
    assert "self-signed" in printed.lower()
    cert = next(keys.glob("*cert*.pem"))
    key = next(keys.glob("*key*.pem"))
    out = tmp_path / "signed"
    assert main(["sample", "--ckpt", str(IMAGE_RUN), "--class-labels", "0", "--num-sampling-steps", "2",
                 "--c2pa-cert", str(cert), "--c2pa-key", str(key), "--out-dir", str(out)]) == 0
    assert "signed 2 PNGs" in capsys.readouterr().err  # the sample and the grid
    assert main(["verify", str(out / "000000.png"), "--json"]) == 0
    report = capsys.readouterr().out
    assert "trainedAlgorithmicMedia" in report and "DiT-T/4" in report
    unsigned = tmp_path / "unsigned"
    assert main(["sample", "--ckpt", str(IMAGE_RUN), "--class-labels", "0", "--num-sampling-steps", "2",
                 "--out-dir", str(unsigned)]) == 0
    assert "credentials: off" in capsys.readouterr().err
    assert main(["verify", str(unsigned / "000000.png")]) == 1
    assert main(["sample", "--ckpt", str(IMAGE_RUN), "--c2pa-cert", str(cert), "--out-dir", str(tmp_path / "x")]) == 2


def test_blocklist_refuses_a_prompt_naming_the_rule_only(tmp_path, capsys):
    rules = tmp_path / "rules.txt"
    rules.write_text("no-sums: 12+\n")
    assert main(["sample", "--ckpt", str(TEXT_RUN), "--prompt", "１２+", "--blocklist", str(rules),
                 "--out-dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "refused by the safety rule 'no-sums'" in err and "１２" not in err
    assert not (tmp_path / "s").exists()  # nothing written


def test_latent_trajectories_are_decoded_like_the_samples(pipe, tmp_path):
    """A latent model's trajectory (recorded as latents by the one batch loop) comes back as pixels:
    each recorded latent through the same VAE, the noisy states then clamped; the samples equal the
    decoded latents of the same call without a VAE, whose latents stay unclamped."""
    diffusers = pytest.importorskip("diffusers")
    import copy

    from ditkit.models.dit import build_dit
    from ditkit.pipelines.image import ImagePipeline

    with torch.random.fork_rng():
        torch.manual_seed(0)
        diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                                up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 8), layers_per_block=1,
                                latent_channels=4, norm_num_groups=4, sample_size=16).save_pretrained(tmp_path / "vae")
        model = build_dit("DiT-T/2", input_size=4, in_channels=4, num_classes=4, learn_sigma=True)
    cfg = copy.deepcopy(pipe.cfg)
    cfg.data.latent_channels, cfg.data.vae_downsample, cfg.data.vae = 4, 4, str(tmp_path / "vae")
    kwargs = dict(class_labels=[0, 3, 1], num_inference_steps=4, guidance_scale=2.0, seed=3, trajectory_points=3,
                  batch_size=2)  # two batches: the recorder's rows stay in sample order (one batch: the same)
    with_vae = ImagePipeline(model, cfg)  # the recorded VAE
    vae, decoded = with_vae.vae, with_vae(**kwargs)
    one_batch = with_vae(**{**kwargs, "batch_size": 3})  # each sample depends on its own seed only
    torch.testing.assert_close(decoded.trajectory, one_batch.trajectory)
    torch.testing.assert_close(decoded.trajectory_xt, one_batch.trajectory_xt)
    with_vae.vae = None  # the same model sampled in latent space
    latents = with_vae(**kwargs)
    assert latents.trajectory.shape == (3, 3, 4, 4, 4) and decoded.trajectory.shape == (3, 3, 3, 16, 16)
    torch.testing.assert_close(decoded.tensors, vae.decode_to(latents.tensors, 3).cpu())
    decode = lambda z: vae.decode_to(z.flatten(0, 1), 3).view(3, 3, 3, 16, 16)  # noqa: E731
    torch.testing.assert_close(decoded.trajectory, decode(latents.trajectory))
    assert latents.trajectory_xt.abs().max() > 1.0  # raw latents stay unclamped ...
    torch.testing.assert_close(decoded.trajectory_xt, decode(latents.trajectory_xt).clamp(-1, 1))  # ... pixels do not
