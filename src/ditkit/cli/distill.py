"""``ditkit distill``: progressive distillation (Salimans & Ho 2022) of a gaussian run into a student
that samples with DDIM in ``--steps`` steps, as consecutive normal training runs.

    ditkit distill --teacher RUN --steps 4 [--start-steps 64] --steps-per-round 500 | --time-budget-per-round 5m

Round ``k`` trains ``RESULTS/RUN_NAME/round_K_NSTEPS`` (objective ``distill``, ``ditkit.diffusion.distill``):
a student initialised from its teacher (``--init-from``) learns to take one DDIM step where the
teacher takes two; the next round's teacher is this round's run. Rounds go from ``--start-steps``
(default: the teacher's own step count, rounded up to ``--steps`` times a power of two) down to
``--steps``. ``RUN_NAME/distill.json`` holds the plan and which rounds are done;
``--resume RESULTS/RUN_NAME`` continues the unfinished round from its newest checkpoint (bitwise, as
``ditkit train --resume``) and runs the rounds after it. Every round's run samples through the
normal pipeline (``ditkit sample --ckpt RUN/round_K_NSTEPS``: ddim, N steps, cfg 1: the original
teacher's guidance is baked into the student, see docs/fast_sampling.md).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from ditkit.config import Config, ConfigError, apply_overrides, parse_set_option
from ditkit.registry import COMMANDS
from ditkit.fileio import write_text

__all__ = ["register", "cmd_distill", "plan_rounds", "round_config", "default_start_steps", "PLAN_FILE", "final_run"]

PLAN_FILE = "distill.json"


def plan_rounds(start_steps: int, steps: int) -> list[tuple[int, int]]:
    """``[(teacher_steps, student_steps), ...]`` halving from ``start_steps`` to ``steps``; ConfigError
    unless ``start_steps = steps * 2^k`` with ``k >= 1``."""
    if steps < 1:
        raise ConfigError(f"--steps {steps}: use 1 or more (4 is the usual target)")
    ratio = start_steps // steps
    if start_steps % steps or ratio < 2 or ratio & (ratio - 1):
        choices = ", ".join(str(steps * 2**k) for k in range(1, 6))
        raise ConfigError(f"--start-steps {start_steps} is not --steps {steps} times a power of two: use one of {choices}")
    rounds, n = [], start_steps
    while n > steps:
        rounds.append((n, n // 2))
        n //= 2
    return rounds


def default_start_steps(teacher_cfg: Config, steps: int) -> int:
    """The teacher's ``sample.num_sampling_steps`` rounded up to ``steps * 2^k`` (``k >= 1``); a
    distilled teacher's own step count as it is."""
    own = teacher_cfg.sample.num_sampling_steps
    if teacher_cfg.objective.kind == "distill":
        return own
    return steps * 2 ** max(1, math.ceil(math.log2(max(own, 2 * steps) / steps)))


def _check_teacher(teacher_cfg: Config, path: str) -> None:
    """ConfigError unless ``path`` is a gaussian DiT image run that distillation can start from."""
    from ditkit.builders import model_family
    from ditkit.registry import OBJECTIVES

    kind = teacher_cfg.objective.kind
    if OBJECTIVES.get(kind).meta.get("family") != "gaussian":
        raise ConfigError(f"--teacher {path} is a {kind} model: progressive distillation needs a gaussian (DDPM/DDIM) teacher")
    if teacher_cfg.modality != "image" or model_family(teacher_cfg) != "dit":
        raise ConfigError(f"--teacher {path} is a {teacher_cfg.model.name} model: distillation supports DiT image models")


def round_config(
    teacher_cfg: Config, teacher: str, teacher_steps: int, *, cfg_scale: float, parent: Path, index: int,
    args: argparse.Namespace,
) -> Config:
    """The config of round ``index``: the teacher's model and data, objective ``distill`` with
    ``teacher``/``teacher_steps``/``teacher_cfg_scale``, weights from the teacher, a linearly
    decaying learning rate, and the student's sampling (ddim, ``teacher_steps / 2`` steps, cfg 1)."""
    cfg = Config.from_dict(teacher_cfg.to_dict())
    o, t, s = cfg.objective, cfg.train, cfg.sample
    o.kind, o.learn_sigma, o.prediction, o.loss_weighting = "distill", False, args.prediction, "none"
    o.teacher, o.teacher_steps, o.teacher_cfg_scale = str(teacher), teacher_steps, float(cfg_scale)
    # the student reproduces the guided teacher for its label: no label dropout, so its null class
    # stays untrained and the pipelines refuse guidance on top of the baked-in one
    cfg.model.class_dropout_prob = 0.0 if cfg.data.num_classes else cfg.model.class_dropout_prob
    t.init_from, t.init_class_map, t.lora_rank = str(teacher), None, 0
    t.max_steps, t.epochs, t.time_budget = args.steps_per_round, None, args.time_budget_per_round
    t.lr, t.warmup_steps, t.lr_schedule, t.decay_fraction, t.min_lr_ratio = args.lr, 0, "wsd", 1.0, 0.0  # linear to 0
    t.ema_decay, t.eval_every, t.keep_best, t.sample_every = args.ema_decay, 0, False, 0
    t.ckpt_every, t.keep_last, t.log_every = args.ckpt_every, 2, max(1, min(t.log_every, 10))
    s.sampler, s.num_sampling_steps, s.cfg_scale, s.ddim_eta, s.timestep_spacing = "ddim", teacher_steps // 2, 1.0, 0.0, "uniform"
    s.guide_channels = None
    cfg.run.results_dir, cfg.run.run_name = str(parent), f"round_{index}_{teacher_steps // 2}steps"
    overrides = dict(parse_set_option(item) for item in args.set)
    return apply_overrides(cfg, overrides)


@COMMANDS.register("distill", order=15, summary="distil a gaussian run into a few-step DDIM student (progressive distillation)")
def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "distill", help="distil a gaussian run into a few-step DDIM student (progressive distillation)",
        description="Progressive distillation (Salimans & Ho 2022): rounds of normal training runs, each halving "
                    "the DDIM steps, from --start-steps to --steps. See docs/fast_sampling.md.")
    p.add_argument("--teacher", metavar="RUN_OR_CKPT", help="the trained gaussian run (its EMA weights) to distil")
    p.add_argument("--steps", type=int, default=4, help="DDIM steps of the final student (default 4)")
    p.add_argument("--start-steps", type=int, metavar="N",
                   help="DDIM steps of the first round's teacher: --steps times a power of two (default: the teacher's "
                        "sample.num_sampling_steps rounded up, e.g. 50 -> 64)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps-per-round", type=int, metavar="K", help="optimiser steps of every round")
    length.add_argument("--time-budget-per-round", metavar="DURATION", help="training time of every round (90s, 5m)")
    p.add_argument("--results-dir", default="results", help="where RUN_NAME goes (default results)")
    p.add_argument("--run-name", help="folder of the rounds (default TEACHER-distillSTEPS)")
    p.add_argument("--resume", metavar="DISTILL_DIR", help="continue RESULTS/RUN_NAME: the unfinished round, then the rest")
    p.add_argument("--cfg-scale", type=float, metavar="W",
                   help="guidance to bake into the student (default: the teacher's sample.cfg_scale)")
    p.add_argument("--prediction", choices=["v", "eps", "x0"], default="v",
                   help="what the student predicts (default v: eps cannot take few steps, Salimans & Ho 2022 Sec. 4)")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate of a round, decayed linearly to 0 (default 5e-4)")
    p.add_argument("--ema-decay", type=float, default=0.99, help="EMA decay of the student (default 0.99, with warm-up)")
    p.add_argument("--ckpt-every", type=int, default=50, help="checkpoint every K steps within a round (default 50)")
    p.add_argument("--stop-at-step", type=int, metavar="K",
                   help="save and stop when the current round reaches its step K (continue with --resume)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a value of every round's config, e.g. train.global_batch_size=64")
    p.set_defaults(func=cmd_distill, interrupted_message="aborted (continue with ditkit distill --resume DIR)")


def _read_plan(parent: Path) -> dict[str, Any]:
    path = parent / PLAN_FILE
    if not path.is_file():
        raise ConfigError(f"--resume {parent}: no {PLAN_FILE} there; give the folder ditkit distill created (RESULTS/RUN_NAME)")
    return json.loads(path.read_text())


def _write_plan(parent: Path, plan: dict[str, Any]) -> None:
    write_text(parent / PLAN_FILE, json.dumps(plan, indent=2) + "\n")


def final_run(path: str | Path) -> Path:
    """The run to sample from for ``path``: a round's run directory as it is, or the last round of a
    ``ditkit distill`` folder (its ``distill.json``)."""
    path = Path(path)
    if (path / PLAN_FILE).is_file():
        plan = json.loads((path / PLAN_FILE).read_text())
        return Path(plan["rounds"][-1]["run"])
    return path


def _new_plan(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    from ditkit.checkpoint_io import Checkpoint

    if not args.teacher:
        raise ConfigError("give --teacher RUN (a trained gaussian run), or --resume DIR to continue a distillation")
    if args.steps_per_round is None and args.time_budget_per_round is None:
        raise ConfigError("set the length of a round: --steps-per-round K or --time-budget-per-round 5m")
    if args.steps_per_round is not None and args.steps_per_round < 1:
        raise ConfigError(f"--steps-per-round {args.steps_per_round}: use 1 or more")
    try:
        ckpt = Checkpoint.open(args.teacher)
    except ConfigError as err:
        raise ConfigError(str(err).replace("--ckpt", "--teacher")) from None
    tcfg = ckpt.config
    _check_teacher(tcfg, args.teacher)
    start = args.start_steps if args.start_steps is not None else default_start_steps(tcfg, args.steps)
    rounds = plan_rounds(start, args.steps)
    if start >= tcfg.objective.num_timesteps:
        raise ConfigError(f"--start-steps {start} must be below the teacher's {tcfg.objective.num_timesteps} timesteps")
    if tcfg.objective.kind == "distill" and start != tcfg.sample.num_sampling_steps:
        raise ConfigError(f"--teacher {args.teacher} is a distilled {tcfg.sample.num_sampling_steps}-step student: "
                          f"use --start-steps {tcfg.sample.num_sampling_steps}")
    if args.cfg_scale is not None:
        scale = args.cfg_scale
    else:  # a distilled teacher carries its guidance in objective.teacher_cfg_scale
        scale = tcfg.objective.teacher_cfg_scale if tcfg.objective.kind == "distill" else tcfg.sample.cfg_scale
    scale = scale if tcfg.data.num_classes else 1.0
    if scale != 1.0 and not (tcfg.model.class_dropout_prob or 0) and tcfg.objective.kind != "distill":
        raise ConfigError(f"--teacher {args.teacher} never trained its unconditional branch (class_dropout_prob 0): use --cfg-scale 1")
    name = args.run_name or f"{Path(ckpt.run_dir).name}-distill{args.steps}"
    parent = Path(args.results_dir) / name
    if (parent / PLAN_FILE).exists():
        raise ConfigError(f"{parent} already holds a distillation: continue it with --resume {parent}, or pick another --run-name")
    plan = {
        "teacher": str(Path(ckpt.dir).resolve()), "teacher_run": str(Path(ckpt.run_dir).resolve()),
        "teacher_cfg_scale": scale, "start_steps": start, "steps": args.steps,
        "steps_per_round": args.steps_per_round, "time_budget_per_round": args.time_budget_per_round,
        "prediction": args.prediction, "lr": args.lr, "ema_decay": args.ema_decay, "ckpt_every": args.ckpt_every,
        "set": list(args.set),
        "rounds": [{"round": k + 1, "teacher_steps": ts, "student_steps": ss, "run": str((parent / f"round_{k + 1}_{ss}steps").resolve()),
                    "done": False} for k, (ts, ss) in enumerate(rounds)],
    }
    return parent, plan


def cmd_distill(args: argparse.Namespace) -> int:
    from ditkit.checkpoint_io import Checkpoint, latest_checkpoint
    from ditkit.cli import EXIT_INTERRUPTED
    from ditkit.train.loop import preflight, train

    if args.stop_at_step is not None and args.stop_at_step < 1:
        raise ConfigError(f"--stop-at-step {args.stop_at_step}: must be at least 1")
    if args.resume:
        parent = Path(args.resume)
        plan = _read_plan(parent)
        for key in ("steps_per_round", "time_budget_per_round", "prediction", "lr", "ema_decay", "ckpt_every", "set"):
            setattr(args, key, plan[key])  # the plan's settings, so the rounds still to start match
    else:
        parent, plan = _new_plan(args)
        _write_plan(parent, plan)
    total = len(plan["rounds"])
    print(f"distilling {plan['teacher']} from {plan['start_steps']} to {plan['steps']} DDIM steps in {total} round(s) "
          f"into {parent} (guidance {plan['teacher_cfg_scale']:g} baked in)", flush=True)
    for i, record in enumerate(plan["rounds"]):
        if record["done"]:
            continue
        run_dir = Path(record["run"])
        teacher = plan["teacher"] if i == 0 else plan["rounds"][i - 1]["run"]
        if latest_checkpoint(run_dir) is not None:  # an unfinished round: continue it exactly
            cfg, resume = Checkpoint.open(run_dir).config, run_dir
        else:
            tcfg = Checkpoint.open(teacher).config
            cfg, resume = round_config(tcfg, teacher, record["teacher_steps"], cfg_scale=plan["teacher_cfg_scale"],
                                       parent=parent.resolve(), index=record["round"], args=args), None
            preflight(cfg)
        print(f"round {record['round']}/{total}: {record['teacher_steps']} -> {record['student_steps']} steps, "
              f"teacher {teacher}", flush=True)
        start = time.perf_counter()
        result = train(cfg, resume=resume, stop_at_step=args.stop_at_step)
        wall = time.perf_counter() - start
        per_step = wall / max(1, result.steps_this_session)
        print(f"round {record['round']}: {result.steps_this_session} steps in {wall:.1f} s ({per_step:.2f} s per student step, "
              f"setup included), step {result.step}, checkpoint {result.checkpoint}", flush=True)
        if result.stop_reason in ("interrupt", "stop_at_step"):
            print(f"stopped in round {record['round']}: continue with ditkit distill --resume {parent}")
            return EXIT_INTERRUPTED
        record.update(done=True, step=result.step, seconds_per_step=round(per_step, 4))
        _write_plan(parent, plan)
    final = plan["rounds"][-1]["run"]
    print(f"distilled: {final} (ddim, {plan['steps']} steps, cfg 1; guidance {plan['teacher_cfg_scale']:g} baked in). "
          f"Sample with: ditkit sample --ckpt {final}")
    return 0
