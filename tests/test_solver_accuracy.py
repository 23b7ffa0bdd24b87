"""Accuracy of the Gaussian ODE solvers on an exact problem, against diffusers (issue 14.1, issue 21).

Problem: data x0 ~ N(0.3, 0.5^2) per dimension, eps prediction, ``make_schedule("cosine", 1000)`` (and
the default "linear"),
the closed-form denoiser E[x0 | x_t], x_T = 20,000 standard normals at index 999. The probability-flow
ODE is linear here, so its exact solution is the quantile map x0 = mu + sqrt(v) z with
z = (x_T - a mu) / sqrt(a^2 v + s^2). Each solver's RMS error against it at 10/25/50 network calls
must be within 2x of diffusers' DPMSolverMultistepScheduler (default config: dpmsolver++, midpoint,
lower_order_final, final_sigmas_type="zero", linspace spacing) with the same number of calls. The
reference is computed with diffusers when it is installed, else the numbers recorded below.
"""

import math
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' numpy 2 copy= notice

from ditkit.diffusion import make_schedule, space_timesteps
from ditkit.registry import SAMPLERS
from ditkit.samplers.dpm_solver_3m import dpm_solver_pp_3m
from ditkit.samplers.gaussian import ddim, ddpm, dpm_solver_pp_2m, solver_steps

MU, VAR = 0.3, 0.25
SCHEDULES = {name: make_schedule(name, 1000) for name in ("cosine", "linear")}
ALPHAS_CUMPROD = SCHEDULES["cosine"].alphas_cumprod
STEPS = (10, 25, 50)

# diffusers 0.42.1, DPMSolverMultistepScheduler(trained_betas=cosine betas, solver_order=k), same
# problem and seed; RMS error per number of network calls.
RECORDED_DIFFUSERS = {
    ("cosine", 2): {10: 2.5333e-02, 25: 1.8326e-04, 50: 5.1102e-04},
    ("cosine", 3): {10: 2.1119e-02, 25: 6.2719e-03, 50: 2.3629e-03},
    ("linear", 2): {10: 9.756e-02, 25: 1.231e-02, 50: 2.329e-04},
    ("linear", 3): {10: 9.315e-02, 25: 1.460e-02, 50: 6.175e-03},
}
# ditkit DDIM on space_timesteps(1000, n) (n calls, unchanged by issue 14.1): pins that it is not harmed.
RECORDED_DDIM = {10: 7.977351e-02, 25: 3.135094e-02, 50: 1.562420e-02}


class ExactDenoiser:
    """E[x0 | x_t] for x0 ~ N(MU, VAR), x_t = a x0 + s eps (eps prediction derived from it); counts calls."""

    def __init__(self, alphas_cumprod: torch.Tensor = ALPHAS_CUMPROD) -> None:
        self.calls, self.alphas_cumprod = 0, alphas_cumprod

    def __call__(self, x: torch.Tensor, t_index: torch.Tensor) -> SimpleNamespace:
        self.calls += 1
        abar = self.alphas_cumprod[int(t_index[0])].item()
        x0 = MU + math.sqrt(abar) * VAR / (abar * VAR + 1 - abar) * (x - math.sqrt(abar) * MU)
        return SimpleNamespace(x0=x0, eps=(x - math.sqrt(abar) * x0) / math.sqrt(1 - abar), var_frac=None)


X_T = torch.randn(20_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _exact(x_T: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    abar = alphas_cumprod[999].item()
    z = (x_T - math.sqrt(abar) * MU) / math.sqrt(abar * VAR + 1 - abar)
    return MU + math.sqrt(VAR) * z


def _rms(x: torch.Tensor, alphas_cumprod: torch.Tensor = ALPHAS_CUMPROD) -> float:
    return (x - _exact(X_T, alphas_cumprod)).pow(2).mean().sqrt().item()


def _diffusers_error(schedule: str, num_inference_steps: int, order: int) -> float:
    """RMS error of diffusers' DPMSolverMultistepScheduler, or the recorded number without diffusers."""
    try:
        from diffusers import DPMSolverMultistepScheduler
    except ImportError:
        return RECORDED_DIFFUSERS[schedule, order][num_inference_steps]
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, trained_betas=SCHEDULES[schedule].betas.numpy(), solver_order=order
    )
    scheduler.set_timesteps(num_inference_steps)
    alphas_cumprod = SCHEDULES[schedule].alphas_cumprod
    denoiser, x = ExactDenoiser(alphas_cumprod), X_T.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(denoiser(x, t.reshape(1)).eps, t, x).prev_sample
    assert denoiser.calls == num_inference_steps
    return _rms(x, alphas_cumprod)


@pytest.mark.parametrize("num_inference_steps", STEPS)
@pytest.mark.parametrize("order,solver", [(2, dpm_solver_pp_2m), (3, dpm_solver_pp_3m)])
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_solver_within_2x_of_diffusers(schedule, order, solver, num_inference_steps):
    alphas_cumprod = SCHEDULES[schedule].alphas_cumprod
    denoiser = ExactDenoiser(alphas_cumprod)
    # the grid with its data end: n + 1 points ending at index 0 -> n calls (as diffusers' linspace)
    x = solver(denoiser, X_T, alphas_cumprod, space_timesteps(1000, num_inference_steps + 1))
    assert denoiser.calls == num_inference_steps
    ours, reference = _rms(x, alphas_cumprod), _diffusers_error(schedule, num_inference_steps, order)
    # measured (ditkit / diffusers) at 10, 25, 50 calls, cosine: 2M 2.54e-2/2.53e-2, 2.19e-4/1.83e-4,
    # 4.93e-4/5.11e-4; 3M 2.12e-2/2.11e-2, 2.47e-3/6.27e-3, 1.17e-3/2.36e-3. linear: 2M equal to 4
    # digits; 3M 9.32e-2/9.32e-2, 1.08e-2/1.46e-2, 2.55e-3/6.18e-3
    assert ours <= 2 * reference, f"{solver.__name__} at {num_inference_steps} calls: {ours:.3e} vs diffusers {reference:.3e}"


def test_ddpm_grid_no_longer_steps_into_index_0():
    # issue 14.1's input: the DDPM grid space_timesteps(1000, 25) ends at index 0. Before the fix the
    # solver took a second-order step with h = 2.5 into index 0 and then a nearly empty one (RMS 3.3e-2).
    # Index 0 is now the data end: 24 calls, RMS 6.3e-4.
    denoiser = ExactDenoiser()
    x = dpm_solver_pp_2m(denoiser, X_T, ALPHAS_CUMPROD, space_timesteps(1000, 25))
    assert denoiser.calls == 24 and _rms(x) < 1e-3


def test_solver_steps_put_data_at_the_grid_end():
    steps = solver_steps(ALPHAS_CUMPROD, space_timesteps(1000, 26))
    assert [t for t, _, _ in steps][-3:] == [120, 80, 40] and len(steps) == 25  # diffusers' linspace points
    assert steps[-1][2] == 1.0 and all(nxt < 1.0 for _, _, nxt in steps[:-1])
    assert solver_steps(ALPHAS_CUMPROD, [999, 500])[-1] == (500, ALPHAS_CUMPROD[500].item(), 1.0)  # data appended
    assert [t for t, _, _ in solver_steps(ALPHAS_CUMPROD, [0])] == [0]  # a lone 0 is still one call
    with pytest.raises(ValueError, match="strictly decreasing"):
        solver_steps(ALPHAS_CUMPROD, [0, 999])


@pytest.mark.parametrize("num_inference_steps", STEPS)
def test_ddim_not_harmed(num_inference_steps):
    x = ddim(ExactDenoiser(), X_T, ALPHAS_CUMPROD, space_timesteps(1000, num_inference_steps))
    assert _rms(x) == pytest.approx(RECORDED_DDIM[num_inference_steps], rel=1e-5)


def test_ddpm_mean_not_harmed():
    x = ddpm(ExactDenoiser(), X_T, ALPHAS_CUMPROD, space_timesteps(1000, 250), generator=torch.Generator().manual_seed(0))
    assert abs(x.mean().item() - MU) < 0.01 and abs(x.std().item() - math.sqrt(VAR)) < 0.01


def test_gaussian_samplers_registered_with_one_signature():
    expected = {"ddpm": (), "ddim": ("eta",), "dpm++": (), "dpm++3m": ()}
    for name, options in expected.items():
        entry = SAMPLERS.get(name, family="gaussian")
        assert entry.options == options
        calls, seen = ExactDenoiser(), []
        x = entry.obj(
            calls, X_T[:8].clone(), ALPHAS_CUMPROD, space_timesteps(1000, 6),
            generator=torch.Generator().manual_seed(0), callback=lambda i, x, x0: seen.append(i),
        )
        assert x.shape == (8,) and seen == list(range(calls.calls)), name  # one callback per network call
    assert SAMPLERS.get("dpm++").zero_is_data and not SAMPLERS.get("ddim").meta.get("zero_is_data")
