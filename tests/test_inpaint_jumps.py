"""RePaint's resampling jumps (Lugmayr et al. 2022, Sec. 4.2) in ditkit.samplers.inpaint, for the
gaussian, flow and edm families, on the 4-D Gaussian data of tests/test_inpaint.py (exact denoisers),
and through the image pipeline and the CLI (the fixture model of tests/test_control.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ditkit.diffusion.schedules import space_timesteps
from ditkit.errors import ConfigError
from ditkit.samplers.edm import edm_euler, karras_sigmas
from ditkit.samplers.flow import euler, flow_timesteps
from ditkit.samplers.gaussian import ddim, ddpm
from ditkit.samplers.inpaint import (
    ancestral_step,
    check_jumps,
    edm_adapter,
    flow_adapter,
    forward_jump,
    gaussian_adapter,
    inpaint,
    resample_num_calls,
    resample_schedule,
)
from test_inpaint import ABAR, D, EDM, GAUSS, KNOWN, MASK, VEL, exact_conditional, image_batch

FIXTURES = Path(__file__).parent / "fixtures" / "outputs"
IMAGE_RUN = FIXTURES / "image_ckpt"  # DiT-T/4, 16x16 RGB, 4 classes, gaussian with learned sigma


# ---- the schedule ---------------------------------------------------------------------------------


def test_schedule_pattern_for_two_jumps_of_two_on_six_levels():
    # RePaint's t = 5 - p; jump points t in {0, 2}: at t = 2 (p = 3) back up to p = 1, at t = 0 (p = 5) to p = 3
    assert resample_schedule(6, 2, 2) == [0, 1, 2, 3, 2, 1, 2, 3, 4, 5, 4, 3, 4, 5, 6]
    assert resample_schedule(6) == list(range(7))  # r = 1: straight down


@pytest.mark.parametrize("n,j,r", [(6, 2, 2), (10, 3, 4), (7, 1, 3), (250, 10, 10), (5, 4, 2)])
def test_schedule_walks_one_level_at_a_time_from_the_top_to_the_data(n, j, r):
    s = resample_schedule(n, j, r)
    assert s[0] == 0 and s[-1] == n and min(s) == 0 and max(s) == n
    assert all(abs(b - a) == 1 for a, b in zip(s, s[1:]))
    assert n not in s[:-1]  # the data level is reached once, at the end
    downs = sum(b > a for a, b in zip(s, s[1:]))
    ups = len(s) - 1 - downs
    assert downs == resample_num_calls(n, j, r) and downs - ups == n
    jump_points = len(range(0, n - j, j))
    assert ups == (r - 1) * j * jump_points
    tops = [s[i] for i in range(1, len(s) - 1) if s[i - 1] < s[i] > s[i + 1]]  # where a jump starts
    assert sorted(set(tops)) == sorted(n - 1 - t for t in range(0, n - j, j))
    assert all(tops.count(p) == r - 1 for p in set(tops))
    assert resample_num_calls(250, 10, 10) == 2410  # RePaint's setting: 250 levels, j = r = 10


@pytest.mark.parametrize("j,r,n,match", [
    (0, 2, 10, "--jump-length 0"), (2, 0, 10, "--jump-n-sample 0"), (2.5, 2, 10, "--jump-length 2.5"),
    (3, 1, 10, "does nothing"), (10, 2, 10, "not shorter than the 10 sampling steps"),
])
def test_bad_jump_values_are_one_line_errors(j, r, n, match):
    with pytest.raises(ConfigError, match=match) as e:
        check_jumps(j, r, n)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=match):
        inpaint(ddim, GAUSS, torch.zeros(2, D, dtype=torch.float64), ABAR, space_timesteps(1000, n),
                image=image_batch(2), mask=MASK, adapter=gaussian_adapter(ABAR), jump_length=j, jump_n_sample=r)


# ---- the generic steps ----------------------------------------------------------------------------


def _pair(a: float, s: float, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((n,), a, dtype=torch.float64), torch.full((n,), s, dtype=torch.float64)


@pytest.mark.parametrize("family,hi,lo", [
    ("gaussian", 700, 300), ("gaussian", 300, 299), ("flow", 1.0, 0.6), ("flow", 0.5, 0.1),
    ("edm", 20.0, 3.0), ("edm", 1.0, 0.2),
])
def test_posterior_step_with_the_true_x0_keeps_the_forward_marginal(family, hi, lo):
    """x0 ~ N(0.5, 0.3^2); x_l ~ q(x_l | x0); one ancestral step to l' with the true x0 must be
    distributed as q(x_l' | x0): mean a' E x0, variance a'^2 Var x0 + s'^2, covariance with x0 a' Var x0.
    The jump back up maps that to q(x_l | x0) again."""
    n = 200_000
    g = torch.Generator().manual_seed(0)
    adapter = {"gaussian": gaussian_adapter(ABAR), "flow": flow_adapter(), "edm": edm_adapter()}[family]
    dtype = torch.long if family == "gaussian" else torch.float64
    level, lower = adapter.scales(torch.tensor([hi], dtype=dtype)), adapter.scales(torch.tensor([lo], dtype=dtype))
    x0 = 0.5 + 0.3 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    x = level[0] * x0 + level[1] * torch.randn(n, 1, generator=g, dtype=torch.float64)
    for frm, to, step in [(level, lower, "down"), (lower, level, "up")]:
        noise = torch.randn(n, 1, generator=g, dtype=torch.float64)
        x = ancestral_step(x, x0, frm, to, noise) if step == "down" else forward_jump(x, frm, to, noise)
        a, s = float(to[0]), float(to[1])
        var = a**2 * 0.09 + s**2
        assert abs(x.mean().item() - 0.5 * a) < 5 * math.sqrt(var / n), (step, x.mean(), 0.5 * a)
        assert abs(x.var().item() / var - 1) < 0.02, (step, x.var(), var)
        cov = ((x - x.mean()) * (x0 - x0.mean())).mean().item()
        assert abs(cov - 0.09 * a) < 0.01 * math.sqrt(var), (step, cov, 0.09 * a)


def test_gaussian_ancestral_step_is_ddpm_eq7_and_the_data_step_returns_x0():
    """For gaussian levels the generic step is DDPM's posterior (Ho et al. 2020, eq. 7) on the respaced chain."""
    x, x0, noise = torch.randn(3, 5, 4, dtype=torch.float64).unbind(0)
    t, t_next = 600, 450
    abar, abar_next = ABAR[t].item(), ABAR[t_next].item()
    beta = 1 - abar / abar_next
    mean = beta * math.sqrt(abar_next) / (1 - abar) * x0 + (1 - abar_next) * math.sqrt(1 - beta) / (1 - abar) * x
    std = math.sqrt(beta * (1 - abar_next) / (1 - abar))
    scales = gaussian_adapter(ABAR).scales
    out = ancestral_step(x, x0, scales(torch.full((5,), t)), scales(torch.full((5,), t_next)), noise)
    torch.testing.assert_close(out, mean + std * noise, rtol=1e-12, atol=1e-12)
    data = _pair(1.0, 0.0, 5)
    torch.testing.assert_close(ancestral_step(x, x0, scales(torch.full((5,), t)), data, noise), x0)


# ---- inpainting with jumps on the exact-denoiser Gaussian ---------------------------------------


def run(family: str, n: int, seed: int, jump_length: int = 1, jump_n_sample: int = 1, callback=None):
    """Inpaint n copies of test_inpaint's image with 50 levels of the family's grid."""
    image = image_batch(n)
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(n, D, generator=g, dtype=torch.float64)
    kw = dict(image=image, mask=MASK, generator=g, callback=callback, jump_length=jump_length,
              jump_n_sample=jump_n_sample)
    if family == "gaussian":
        return inpaint(ddpm, GAUSS, x_T, ABAR, space_timesteps(1000, 50), adapter=gaussian_adapter(ABAR), **kw)
    if family == "flow":
        return inpaint(euler, VEL, x_T, flow_timesteps(50), adapter=flow_adapter(), **kw)
    sigmas = karras_sigmas(50, 0.002, 20.0).double()
    return inpaint(edm_euler, EDM, sigmas[0] * x_T, sigmas, adapter=edm_adapter(), **kw)


def gap_to_the_conditional(out: torch.Tensor) -> float:
    """|mean of the unknown dims - exact conditional mean|, in conditional standard deviations."""
    mean, cov = exact_conditional(image_batch(1)[0])
    return float(((out[:, ~KNOWN].mean(0) - mean) / cov.diagonal().sqrt()).norm())


@pytest.mark.parametrize("family", ["gaussian", "flow", "edm"])
def test_jumps_keep_the_known_region_and_pull_the_unknown_toward_the_conditional(family):
    """Measured (n = 2000, seeds 0-3; see docs/control.md): plain 0.61-0.67 (gaussian ddpm), 0.75-0.81
    (flow), 0.68-0.75 (edm, Karras grid); with j = r = 5: 0.28-0.34, 0.22-0.26, 0.25-0.29."""
    n = 2000
    plain = run(family, n, seed=1)
    jumped = run(family, n, seed=1, jump_length=5, jump_n_sample=5)
    image = image_batch(n)
    assert torch.equal(jumped[:, KNOWN], image[:, KNOWN])
    assert torch.isfinite(jumped).all()
    assert jumped[:, ~KNOWN].std(0).min() > 0.1  # still samples, not a collapse onto the mean
    before, after = gap_to_the_conditional(plain), gap_to_the_conditional(jumped)
    assert after < 0.65 * before, (before, after)
    _, cov = exact_conditional(image[0])
    ratio = torch.cov(jumped[:, ~KNOWN].T).diagonal().sqrt() / cov.diagonal().sqrt()
    assert ((ratio > 0.8) & (ratio < 1.1)).all(), ratio  # the spread stays near the conditional's


def test_plain_path_is_unchanged_and_callbacks_count_the_network_calls():
    assert torch.equal(run("gaussian", 8, seed=3), run("gaussian", 8, seed=3, jump_length=1, jump_n_sample=1))
    seen = []
    run("flow", 8, seed=4, jump_length=3, jump_n_sample=2, callback=lambda i, x, x0: seen.append((i, x0)))
    assert [i for i, _ in seen] == list(range(resample_num_calls(50, 3, 2)))
    assert len(seen) == 50 + 3 * len(range(0, 47, 3))
    for _, x0 in seen:  # the known region of the data prediction is the original at every call
        torch.testing.assert_close(x0[:, KNOWN], image_batch(8)[:, KNOWN], rtol=0, atol=1e-12)


def test_every_network_call_sees_the_noised_original_in_the_known_region():
    """With jumps too, the known dims of each network input are a fresh q(x_t | x0) draw."""
    n, image = 2000, image_batch(2000)
    zs = []

    def spy(x, t):
        abar = ABAR[t[0]].item()
        zs.append((x[:, KNOWN].mean(0) - math.sqrt(abar) * image[0, KNOWN]) / math.sqrt(1 - abar))
        return GAUSS(x, t)

    g = torch.Generator().manual_seed(5)
    x_T = torch.randn(n, D, generator=g, dtype=torch.float64)
    inpaint(ddim, spy, x_T, ABAR, space_timesteps(1000, 6), image=image, mask=MASK, adapter=gaussian_adapter(ABAR),
            generator=g, jump_length=2, jump_n_sample=3)
    assert len(zs) == resample_num_calls(6, 2, 3) == 14
    assert max(float(z.abs().max()) for z in zs) < 5 / math.sqrt(n)


# ---- the image pipeline and the CLI ---------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    import ditkit

    return ditkit.load(IMAGE_RUN, device="cpu")


def half_mask(n: int = 2) -> torch.Tensor:
    mask = torch.zeros(n, 1, 16, 16)
    mask[..., :, 8:] = 1  # regenerate the right half
    return mask


def test_pipeline_jumps_keep_the_known_region_and_count_progress(pipe):
    original = pipe(class_labels=[0, 1], num_inference_steps=4, guidance_scale=1.0, seed=0).tensors
    ticks = []
    out = pipe(class_labels=[2, 3], num_inference_steps=4, guidance_scale=2.0, seed=5, sampler="ddim",
               image=original, mask_image=half_mask(), jump_length=2, jump_n_sample=2, trajectory_points=3,
               progress=ticks.append)
    keep = (half_mask() == 0).expand_as(original)
    assert torch.equal(out.tensors.masked_select(keep), original.masked_select(keep))
    assert not torch.allclose(out.tensors[..., 8:], original[..., 8:], atol=1e-3)
    assert len(ticks) == resample_num_calls(4, 2, 2) == 6  # 4 levels + one jump of 2 back up
    assert out.trajectory.shape[1] == 3 and out.trajectory_steps[-1] == 5  # spread over the 6 calls
    assert "resampling jumps 2x2" in out.metadata["control"]
    plain = pipe(class_labels=[2, 3], num_inference_steps=4, guidance_scale=2.0, seed=5, sampler="ddim",
                 image=original, mask_image=half_mask())
    assert not torch.equal(plain.tensors, out.tensors)


def test_pipeline_refuses_jumps_without_a_mask(pipe):
    with pytest.raises(ConfigError, match="give --init-image with --mask or --extend"):
        pipe(class_labels=[0], num_inference_steps=4, jump_length=2, jump_n_sample=2)
    with pytest.raises(ConfigError, match="give --init-image with --mask or --extend"):
        pipe(class_labels=[0], num_inference_steps=4, image=torch.zeros(1, 3, 16, 16), strength=0.5, jump_n_sample=2)


@pytest.mark.parametrize("flags,message", [
    (["--jump-length", "0", "--jump-n-sample", "2"], "--jump-length 0: must be an integer >= 1"),
    (["--jump-n-sample", "2"], "give --init-image with --mask or --extend"),
    (["--jump-length", "4", "--jump-n-sample", "2", "--mask", "MASK"], "--jump-length 4 is not shorter than the 4"),
    (["--jump-length", "2", "--mask", "MASK"], "does nothing with --jump-n-sample 1"),
])
def test_cli_jump_flag_errors_are_one_line(tmp_path, capsys, flags, message):
    from PIL import Image

    from ditkit.cli import main

    src, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.new("RGB", (16, 16), (120, 30, 200)).save(src)
    Image.fromarray((half_mask(1)[0, 0].numpy() * 255).astype("uint8")).save(mask)
    flags = [str(mask) if f == "MASK" else f for f in flags]
    init = ["--init-image", str(src)] if "--mask" in flags else []
    code = main(["sample", "--ckpt", str(IMAGE_RUN), "--class-labels", "1", "--num-sampling-steps", "4", *init, *flags,
                 "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cli_jumps_write_the_inpainted_image(tmp_path):
    import numpy as np
    from PIL import Image

    from ditkit.cli import main

    src, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(src)
    Image.fromarray((half_mask(1)[0, 0].numpy() * 255).astype(np.uint8)).save(mask)
    out = tmp_path / "out"
    assert main(["sample", "--ckpt", str(IMAGE_RUN), "--class-labels", "1", "--num-sampling-steps", "4",
                 "--init-image", str(src), "--mask", str(mask), "--jump-length", "2", "--jump-n-sample", "2",
                 "--out-dir", str(out)]) == 0
    with Image.open(out / "000000.png") as im:
        result = np.asarray(im)
        assert "resampling jumps 2x2" in im.text["control"]
    assert np.array_equal(result[:, :8], np.asarray(Image.open(src))[:, :8])  # the kept half, byte for byte
