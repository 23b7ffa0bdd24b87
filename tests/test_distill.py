"""Progressive distillation (ditkit.diffusion.distill, ditkit distill): the target is two teacher DDIM
steps, the grids nest, a round brings the student's N-step output towards the teacher's 2N-step
output, rounds resume bitwise, the result samples through the normal pipeline, and bad input gets a
one-line error."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import ditkit
from ditkit.cli import main
from ditkit.config import Config, ConfigError
from ditkit.diffusion.distill import ProgressiveDistillation, distillation_grid
from ditkit.diffusion.gaussian import GaussianDiffusion
from ditkit.diffusion.schedules import make_schedule
from ditkit.recipes import get_recipe
from ditkit.samplers.gaussian import ddim
from ditkit.train.checkpoint import latest_checkpoint
from ditkit.train.loop import train


# ---- the target, on a linear teacher -----------------------------------------------------------------


def _fake_cfg(kind="gaussian", name="DiT-T/4", guide_channels=None, num_classes=3):
    return SimpleNamespace(objective=SimpleNamespace(kind=kind, schedule="linear", num_timesteps=1000),
                           model=SimpleNamespace(name=name), sample=SimpleNamespace(guide_channels=guide_channels),
                           data=SimpleNamespace(num_classes=num_classes))


def _linear_objective(teacher_steps, scale, prediction="x0"):
    """A distillation objective whose teacher predicts eps = 0.3 x + b[y] (null class 3: b = 0)."""
    schedule = make_schedule("linear", 1000)
    bias = torch.tensor([0.5, -0.2, 0.1, 0.0])

    def net(x, t, y):
        return 0.3 * x + bias[y].reshape(-1, 1, 1, 1)

    teacher = GaussianDiffusion(schedule, prediction="eps", learn_sigma=False, clip_x0=None)
    objective = ProgressiveDistillation(schedule, prediction, teacher="fake", teacher_steps=teacher_steps,
                                        teacher_cfg_scale=scale, load_teacher=lambda path: (net, teacher, _fake_cfg()))
    return objective, net, bias, schedule


@pytest.mark.parametrize("step", [0, 1])  # an inner step (to t'' > 0) and the last one (to the data)
def test_target_is_the_x0_whose_one_ddim_step_lands_on_two_guided_teacher_ddim_steps(step):
    objective, _, bias, schedule = _linear_objective(teacher_steps=4, scale=2.0)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    y = torch.tensor([0, 1, 2])
    steps = torch.full((3,), step)
    z_t, t, target = objective.teacher_target(x0, y, steps, noise)

    grid = [999, 749, 500, 250, 0]  # 4 teacher calls + data; the student (2 calls) takes 999->500->data
    t_s, t_mid, t_next = grid[2 * step], grid[2 * step + 1], grid[2 * step + 2]
    assert t.tolist() == [t_s] * 3
    abar = schedule.alphas_cumprod
    a_t = abar[t_s].item()
    assert torch.allclose(z_t, a_t**0.5 * x0 + (1 - a_t) ** 0.5 * noise)

    # the guided linear teacher by hand: eps = 0.3 x + 2 * b[y] (uncond: 0.3 x)
    def guided_eps(x):
        return 0.3 * x + 2.0 * bias[y].reshape(-1, 1, 1, 1)

    class Pred:
        def __init__(self, x, a):
            self.eps = guided_eps(x)
            self.x0 = (x - (1 - a) ** 0.5 * self.eps) / a**0.5

    seen = []
    ddim(lambda x, tt: Pred(x, abar[int(tt[0])].item()), z_t.double(), abar, [t_s, t_mid] + ([t_next] if t_next else []),
         callback=lambda i, x, _: seen.append(x))
    z_next = seen[1]  # after the teacher's two steps (the data itself on the last step)
    a_next = abar[t_next].item() if t_next else 1.0
    # one DDIM step of the student with x0 = target from z_t lands on z_next
    eps_student = (z_t.double() - a_t**0.5 * target.double()) / (1 - a_t) ** 0.5
    landed = a_next**0.5 * target.double() + (1 - a_next) ** 0.5 * eps_student
    assert torch.allclose(landed, z_next, rtol=1e-4, atol=1e-4)


def test_loss_is_truncated_snr_times_x0_error_and_zero_for_a_student_that_predicts_the_target():
    objective, _, _, schedule = _linear_objective(teacher_steps=8, scale=1.5, prediction="x0")
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 1, 4, 4, generator=g), torch.randn(4, 1, 4, 4, generator=g)
    y, steps = torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 2, 3])
    _, t, target = objective.teacher_target(x0, y, steps, noise)
    oracle = lambda x, tt, yy: target  # noqa: E731  (an x0-predicting student that is exactly right)
    assert objective.loss(oracle, x0, y, t=steps, noise=noise).abs().max() < 1e-10
    zero = lambda x, tt, yy: torch.zeros_like(x)  # noqa: E731
    terms = objective.loss_terms(zero, x0, y, t=steps, noise=noise)
    snr = schedule.alphas_cumprod[t] / (1 - schedule.alphas_cumprod[t])
    assert torch.allclose(terms["weight"].double(), snr.clamp(min=1.0))
    assert torch.allclose(terms["loss"], terms["weight"] * (target**2).flatten(1).mean(1), rtol=1e-5)


def test_global_draws_are_the_draws_of_loss():
    objective, *_ = _linear_objective(teacher_steps=8, scale=1.5, prediction="v")
    x0, y = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 2, 0, 1, 2])
    student = lambda x, t, yy: 0.1 * x + t.reshape(-1, 1, 1, 1) / 1000  # noqa: E731
    drawn = objective.loss(student, x0, y, generator=torch.Generator().manual_seed(5))
    draws = objective.global_draws(x0[2:4], 6, slice(2, 4), torch.Generator().manual_seed(5))
    assert draws["t"].max() < 4  # student steps, not DDPM indices
    assert torch.equal(objective.loss(student, x0[2:4], y[2:4], **draws), drawn[2:4])


def test_grids_nest_and_the_student_samples_on_its_own_grid():
    for n in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        assert distillation_grid(1000, 2 * n)[::2] == distillation_grid(1000, n)
    objective, *_ = _linear_objective(teacher_steps=8, scale=1.0)
    assert objective.sampling_grid(4)[1] == [999, 749, 500, 250]  # 4 calls, then the data
    assert objective.sampling_grid(4, zero_is_data=True)[1] == [999, 749, 500, 250, 0]
    with pytest.raises(ConfigError, match="uniform grid"):
        objective.sampling_grid(4, timestep_spacing="quadratic")


def test_teacher_checks_and_config_errors():
    schedule = make_schedule("linear", 1000)
    teacher = GaussianDiffusion(schedule, prediction="eps", learn_sigma=False)
    obj = ProgressiveDistillation(schedule, "v", teacher="T", teacher_steps=4,
                                  load_teacher=lambda p: (None, teacher, _fake_cfg(name="DiT-S/2")))
    obj.student_model = "DiT-T/4"
    with pytest.raises(ConfigError, match="DiT-S/2 but the student is a DiT-T/4"):
        obj.teacher(torch.device("cpu"))
    other = GaussianDiffusion(make_schedule("cosine", 1000))
    obj = ProgressiveDistillation(schedule, "v", teacher="T", teacher_steps=4, load_teacher=lambda p: (None, other, _fake_cfg()))
    with pytest.raises(ConfigError, match="schedule"):
        obj.teacher(torch.device("cpu"))
    for kind, scale in (("gaussian", 3.0), ("distill", 1.0)):  # a distilled teacher already carries the guidance
        obj = ProgressiveDistillation(schedule, "v", teacher="T", teacher_steps=4, teacher_cfg_scale=3.0,
                                      load_teacher=lambda p: (None, teacher, _fake_cfg(kind=kind)))
        assert obj.teacher(torch.device("cpu"))[2] == scale
    with pytest.raises(ConfigError, match="teacher loader"):
        ProgressiveDistillation(schedule, "v", teacher="T", teacher_steps=4).teacher(torch.device("cpu"))

    cfg = get_recipe("shapes_tiny")
    cfg.objective.kind, cfg.objective.learn_sigma = "distill", False
    for change, message in [({"teacher": None}, "needs a teacher"), ({"teacher": "T", "teacher_steps": 6}, "power of two"),
                            ({"teacher": "T", "teacher_steps": 4, "learn_sigma": True}, "learn_sigma")]:
        bad = Config.from_dict(cfg.to_dict())
        for key, value in change.items():
            setattr(bad.objective, key, value)
        with pytest.raises(ConfigError, match=message):
            ProgressiveDistillation.from_config(bad)


# ---- rounds of real runs -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A DiT-T/4 on 16x16 shapes (v-prediction with learned sigma, guidance 2) trained 100 steps: a
    teacher in seconds. v, as the paper's teachers: an eps student cannot take few steps (its x0 at
    index 999 divides by alpha = 5e-5), and a v student of an eps teacher must first relearn its output."""
    root = tmp_path_factory.mktemp("teacher")
    cfg = get_recipe("shapes_tiny")
    cfg.run.results_dir, cfg.run.run_name = str(root), "teacher"
    cfg.train.max_steps, cfg.train.ckpt_every, cfg.train.log_every = 100, 100, 100
    cfg.model.class_dropout_prob = 0.2
    cfg.objective.prediction = "v"
    train(cfg, log=lambda m: None)
    return root / "teacher"


def _distill(tmp_path, teacher, *extra):
    return main(["distill", "--teacher", str(teacher), "--results-dir", str(tmp_path), "--run-name", "d", *extra])


def test_rounds_halve_the_steps_and_the_result_samples_through_the_pipeline(tmp_path, tiny_teacher, capsys):
    assert _distill(tmp_path, tiny_teacher, "--steps", "1", "--start-steps", "4", "--steps-per-round", "3") == 0
    plan = json.loads((tmp_path / "d" / "distill.json").read_text())
    assert [(r["teacher_steps"], r["student_steps"], r["done"]) for r in plan["rounds"]] == [(4, 2, True), (2, 1, True)]
    assert plan["teacher_cfg_scale"] == 2.0  # the teacher's guidance, baked in
    first, final = tmp_path / "d" / "round_1_2steps", tmp_path / "d" / "round_2_1steps"
    cfg = Config.from_json((final / "config.json").read_text())
    assert (cfg.sample.sampler, cfg.sample.num_sampling_steps, cfg.sample.cfg_scale) == ("ddim", 1, 1.0)
    assert (cfg.objective.kind, cfg.objective.teacher, cfg.objective.teacher_steps) == ("distill", str(first.resolve()), 2)
    assert cfg.objective.teacher_cfg_scale == 2.0 and cfg.model.class_dropout_prob == 0.0
    first_cfg = Config.from_json((first / "config.json").read_text())
    assert Path(first_cfg.objective.teacher) == (tiny_teacher / "checkpoints" / "step_0000100").resolve()

    pipe = ditkit.load(final)
    out = pipe(class_labels=[1, 2], num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    assert out.tensors.shape == (2, 3, 16, 16) and torch.isfinite(out.tensors).all()
    assert out.metadata["sampler"] == "ddim" and out.metadata["cfg_scale"] == "1.0"
    with pytest.raises(ConfigError, match="never trained"):  # guidance twice is refused
        pipe(class_labels=[1], guidance_scale=2.0)
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(final), "--out-dir", str(tmp_path / "s"), "--num-samples", "2"]) == 0
    assert "1 steps" in capsys.readouterr().out and any((tmp_path / "s").iterdir())

    # a distilled run is a teacher too: it starts at its own steps and keeps the original guidance
    assert main(["distill", "--teacher", str(first), "--steps", "1", "--steps-per-round", "2",
                 "--results-dir", str(tmp_path), "--run-name", "again"]) == 0
    again = json.loads((tmp_path / "again" / "distill.json").read_text())
    assert (again["start_steps"], again["teacher_cfg_scale"], len(again["rounds"])) == (2, 2.0, 1)


def test_resume_mid_round_is_bitwise_exact(tmp_path, tiny_teacher):
    flags = ["--steps", "1", "--start-steps", "4", "--steps-per-round", "4", "--ckpt-every", "2"]
    assert main(["distill", "--teacher", str(tiny_teacher), "--results-dir", str(tmp_path), "--run-name", "a", *flags]) == 0
    stopped = main(["distill", "--teacher", str(tiny_teacher), "--results-dir", str(tmp_path), "--run-name", "b",
                    *flags, "--stop-at-step", "3"])
    assert stopped == 130
    plan = json.loads((tmp_path / "b" / "distill.json").read_text())
    assert [r["done"] for r in plan["rounds"]] == [False, False]
    assert main(["distill", "--resume", str(tmp_path / "b")]) == 0
    for name in ("round_1_2steps", "round_2_1steps"):
        a, b = latest_checkpoint(tmp_path / "a" / name), latest_checkpoint(tmp_path / "b" / name)
        assert a.name == b.name == "step_0000004"
        for file in ("model.safetensors", "ema.safetensors"):
            wa, wb = load_file(str(a / file)), load_file(str(b / file))
            assert all(torch.equal(wa[k], wb[k]) for k in wa), f"{name}/{file} differs after resume"


def test_one_round_brings_the_students_n_steps_towards_the_teachers_2n_steps(tmp_path, tiny_teacher):
    """One round 4 -> 2 steps, 60 steps of training from an exact copy of the teacher: the student's
    2-step DDIM output (cfg 1) moves towards the guided teacher's 4-step output on fixed noise (measured:
    mean squared distance 0.059 -> 0.038)."""
    assert _distill(tmp_path, tiny_teacher, "--steps", "2", "--start-steps", "4", "--steps-per-round", "60",
                    "--lr", "1e-3", "--ema-decay", "0.5") == 0
    student, teacher = ditkit.load(tmp_path / "d" / "round_1_2steps"), ditkit.load(tiny_teacher)
    x_T = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    y = torch.arange(32) % teacher.num_classes

    def sample(pipe, steps, scale):
        def net(x, t):
            if scale == 1.0:
                return pipe.model(x, t, y)
            out = pipe.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, pipe.num_classes)]))
            cond, uncond = out.chunk(2)
            return uncond + scale * (cond - uncond)

        with torch.no_grad():
            return ddim(pipe.objective.denoiser(net), x_T, pipe.objective.alphas_cumprod, distillation_grid(1000, steps)[:-1])

    reference = sample(teacher, 4, 2.0)
    before = (sample(teacher, 2, 2.0) - reference).pow(2).mean()
    after = (sample(student, 2, 1.0) - reference).pow(2).mean()
    assert after < 0.8 * before, (after, before)


def test_cli_errors(tmp_path, tiny_teacher):
    def error(*argv):
        with pytest.raises(ConfigError) as info:
            from ditkit.cli import build_parser

            args = build_parser().parse_args(["distill", *argv])
            args.func(args)
        return str(info.value)

    assert "--teacher" in error("--teacher", str(tmp_path / "missing"), "--steps-per-round", "2")
    assert "power of two" in error("--teacher", str(tiny_teacher), "--steps", "4", "--start-steps", "12", "--steps-per-round", "2")
    assert "length of a round" in error("--teacher", str(tiny_teacher), "--steps", "2")
    assert "give --teacher" in error("--steps-per-round", "2")
    assert "distill.json" in error("--resume", str(tmp_path))
    flow = tmp_path / "flow"
    shutil.copytree(tiny_teacher, flow)
    for path in [flow / "config.json", *flow.glob("checkpoints/*/config.json")]:
        data = json.loads(path.read_text())
        data["objective"].update(kind="flow", learn_sigma=False)
        path.write_text(json.dumps(data))
    assert "gaussian" in error("--teacher", str(flow), "--steps-per-round", "2", "--results-dir", str(tmp_path))
    assert _distill(tmp_path, tiny_teacher, "--steps", "2", "--start-steps", "4", "--steps-per-round", "1") == 0
    assert "already holds a distillation" in error("--teacher", str(tiny_teacher), "--steps", "2", "--start-steps", "4",
                                                   "--steps-per-round", "1", "--results-dir", str(tmp_path), "--run-name", "d")
