"""Hyperparameter search with Optuna: ``ditkit sweep`` (issue 22).

A search space is a small TOML or JSON file over any config key::

    train.lr = {log_uniform = [1e-5, 1e-2]}     # a float, uniform in log space
    train.ema_decay = {uniform = [0.99, 0.9995]}
    train.warmup_steps = {int = [0, 200]}        # an integer in [low, high] ({log_int = ...} too)
    objective.schedule = ["linear", "cosine"]    # a list: one of these values (categorical)

(JSON: ``{"train.lr": {"log_uniform": [1e-5, 1e-2]}, ...}`` or nested ``{"train": {"lr": ...}}``).
``load_space`` reads it; ``check_space`` tries every key with its end points (every value of a
list) on the base config before the first trial, so an unknown key, a bad range or a wrong type is
one ``ConfigError`` line.

Two kinds of sweep share one study layout (``STUDY_DIR``):

* ``run_training_sweep``: each trial is a normal ditkit run in ``STUDY_DIR/trials/trial_NNNN`` (its
  own ``config.json``, checkpoints, ``metrics.jsonl``: resumable with ``ditkit train --resume``,
  sampleable with ``ditkit sample --ckpt``). The run evaluates every ``train.eval_every`` steps; the
  ``on_step`` callback of ``ditkit.train.loop.train`` reads each new evaluation line of
  ``metrics.jsonl``, reports it to Optuna (``trial.report(value, step)``) and, when the pruner says
  so, raises ``optuna.TrialPruned`` out of the loop (the trainer closes its files on the way out;
  trials save a checkpoint at every evaluation, so a pruned run keeps the one it was judged on).
  A trial's value is its final evaluation: the last ``metrics.jsonl`` line when it is at the final
  step, else one evaluation of the final checkpoint (a time budget stops between evaluations).
* ``run_sampling_sweep``: sampling-only keys (``SAMPLE_KEYS``) on one finished checkpoint, each
  trial one ``ditkit.eval.model_eval.evaluate_generator`` call on an ``ImagePipeline`` loaded once
  (the path of ``ditkit eval``); results in ``trials/trial_NNNN/eval.json``.

The study lives in ``STUDY_DIR/study.db`` (Optuna's RDB storage on SQLite, or any ``storage``
URL such as PostgreSQL), with a heartbeat: a trial whose process died is failed after
``GRACE_PERIOD_S`` and retried once, continuing its run directory from the newest checkpoint; a
trial stopped by Ctrl-C is queued again the same way. ``write_report`` writes ``report.md``,
``trials.csv``, ``best.json``, ``best_config.json`` (for ``ditkit train --config``) and plots.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from ditkit.config import Config, ConfigError, apply_overrides
from ditkit.fileio import atomic_path, write_text

__all__ = [
    "Param", "METRICS", "SAMPLE_KEYS", "STUDY_FILE", "SETTINGS_FILE", "load_space", "parse_space", "check_space",
    "open_study", "run_training_sweep", "run_sampling_sweep", "write_report", "metric_of", "resolve_metric",
]

DISTRIBUTIONS = ("log_uniform", "uniform", "int", "log_int")
# --metric name -> (metrics.jsonl / results key, direction)
METRICS: dict[str, tuple[str, str]] = {
    "fd": ("fd_classifier", "minimize"),
    "fd_classifier": ("fd_classifier", "minimize"),
    "accuracy": ("conditional_accuracy", "maximize"),
    "conditional_accuracy": ("conditional_accuracy", "maximize"),
    "precision": ("precision", "maximize"),
    "recall": ("recall", "maximize"),
    "bpc": ("val_bits_per_char", "minimize"),
    "val_bits_per_char": ("val_bits_per_char", "minimize"),
}
TEXT_METRICS = ("val_bits_per_char",)
# the keys a sampling-only sweep (--ckpt) may search: the options of evaluate_generator
SAMPLE_KEYS = ("sample.sampler", "sample.num_sampling_steps", "sample.cfg_scale", "sample.timestep_spacing",
               "sample.guide_channels")
STUDY_FILE = "study.db"
SETTINGS_FILE = "sweep.json"
TRIALS_DIR = "trials"
HEARTBEAT_INTERVAL_S, GRACE_PERIOD_S = 30, 120  # a trial silent for GRACE_PERIOD_S is failed and retried once
DEFAULT_EVAL_EVERY_WITH_BUDGET = 100


# ---- the search space ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One searched config key: ``kind`` is a distribution of ``DISTRIBUTIONS`` over
    ``[low, high]``, or ``categorical`` over ``choices``."""

    key: str
    kind: str
    low: Any = None
    high: Any = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        """This key's value for an Optuna ``trial``."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind in ("int", "log_int"):
            return trial.suggest_int(self.key, self.low, self.high, log=self.kind == "log_int")
        return trial.suggest_float(self.key, self.low, self.high, log=self.kind == "log_uniform")

    def probe_values(self) -> list[Any]:
        """Values that stand for the whole range when checking it against the config."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]

    def grid_values(self, source: str) -> list[Any]:
        """Every value, for the grid sampler: a list, or an integer range."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind in ("int", "log_int") and self.high - self.low <= 100:
            return list(range(self.low, self.high + 1))
        raise ConfigError(f"{source}: {self.key} = {self.describe()} has no finite grid: --sampler grid needs lists "
                          f"(e.g. {self.key} = [{self.low}, {self.high}]) or small int ranges; or use --sampler tpe")

    def describe(self) -> str:
        return json.dumps(list(self.choices)) if self.kind == "categorical" else f"{{{self.kind} = [{self.low}, {self.high}]}}"


def parse_space(data: Mapping[str, Any], source: str = "search space") -> list[Param]:
    """Flatten a search space (nested ``{"train": {"lr": ...}}`` or dotted ``{"train.lr": ...}``)
    into ``Param``s, checking the form of each entry (not yet the config: see ``check_space``)."""
    params: list[Param] = []

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for name, value in node.items():
            key = f"{prefix}{name}"
            if isinstance(value, Mapping) and not prefix and "." not in name and not set(value) & set(DISTRIBUTIONS):
                walk(value, key + ".")  # a section table: [train] or train = {lr = ...}
            else:
                params.append(_param(key, value, source))

    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a table of config keys, e.g. train.lr = {{log_uniform = [1e-5, 1e-2]}}")
    walk(data, "")
    if not params:
        raise ConfigError(f"{source} is empty: give at least one key, e.g. train.lr = {{log_uniform = [1e-5, 1e-2]}}")
    return params


def _param(key: str, value: Any, source: str) -> Param:
    where = f"{source}: {key}"
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{where} = []: a list needs at least one value to choose from")
        if any(isinstance(v, (list, dict)) for v in value):
            raise ConfigError(f"{where} = {value}: list values must be numbers, strings or booleans")
        return Param(key, "categorical", choices=tuple(value))
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} = {value!r}: give a range such as {{uniform = [0.1, 0.9]}} or a list of values "
                          f"(a fixed value goes in --set {key}={value})")
    if len(value) != 1 or next(iter(value)) not in DISTRIBUTIONS:
        raise ConfigError(f"{where} = {dict(value)}: give exactly one of {', '.join(DISTRIBUTIONS)}, "
                          f"e.g. {{uniform = [0.1, 0.9]}}")
    (kind, bounds), = value.items()
    if not (isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                                                 for b in bounds)):
        raise ConfigError(f"{where} = {{{kind} = {bounds!r}}}: give [low, high], two numbers")
    low, high = bounds
    if kind in ("int", "log_int") and not all(isinstance(b, int) for b in bounds):
        raise ConfigError(f"{where} = {{{kind} = {bounds}}}: int ranges take whole numbers")
    if not (math.isfinite(low) and math.isfinite(high)) or not low < high:
        raise ConfigError(f"{where} = {{{kind} = {bounds}}}: needs low < high (for one value use --set {key}={low})")
    if kind in ("log_uniform", "log_int") and low <= 0:
        raise ConfigError(f"{where} = {{{kind} = {bounds}}}: a log range needs low > 0")
    if kind in ("uniform", "log_uniform"):
        low, high = float(low), float(high)
    return Param(key, kind, low, high)


def load_space(path: str | Path) -> list[Param]:
    """Read a ``.toml`` or ``.json`` search space file into ``Param``s."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--space {path}: no such file")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"--space {path} is not valid JSON ({err})") from None
    else:
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"--space {path} is not valid TOML ({err}); JSON files need the .json suffix") from None
    return parse_space(data, source=str(path))


def check_space(params: Sequence[Param], base: Config, *, source: str = "search space",
                check: Optional[Callable[[Config], None]] = None) -> None:
    """Try each key at its end points (each value of a list) on ``base``: ``apply_overrides`` checks
    the key and the value's type, ``check`` (default: the trainer's ``preflight``) the values. Raises a
    one-line ``ConfigError`` naming the file, the key and the value."""
    if check is None:
        from ditkit.train.loop import preflight

        check = preflight
    seen = set()
    for p in params:
        if p.key in seen:
            raise ConfigError(f"{source}: {p.key} is given twice")
        seen.add(p.key)
        for value in p.probe_values():
            try:
                check(apply_overrides(base, {p.key: value}))
            except ConfigError as err:
                raise ConfigError(f"{source}: {p.key} = {p.describe()} does not fit at {value!r}: {err}") from None


# ---- metrics -----------------------------------------------------------------------------------------


def resolve_metric(name: str, modality: str) -> tuple[str, str]:
    """``(metrics key, "minimize" | "maximize")`` of ``--metric name`` for a run of ``modality``."""
    if name not in METRICS:
        raise ConfigError(f"--metric {name}: use one of {', '.join(METRICS)}")
    key, direction = METRICS[name]
    if (key in TEXT_METRICS) != (modality == "text"):
        fits = [m for m, (k, _) in METRICS.items() if (k in TEXT_METRICS) == (modality == "text")]
        raise ConfigError(f"--metric {name} does not score {modality} models: use {' or '.join(fits)}")
    return key, direction


def metric_of(line: Mapping[str, Any], key: str) -> Optional[float]:
    value = line.get(key)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


class _EvalWatcher:
    """The ``on_step`` callback of a trial: reads the evaluation lines training appends to
    ``metrics.jsonl`` (only when the file grew), reports each to Optuna and prunes."""

    def __init__(self, path: Path, key: str, trial: Any) -> None:
        self.path, self.key, self.trial = path, key, trial
        self.offset, self.size = 0, -1
        self.last: Optional[tuple[int, float]] = None  # (step, value) of the newest evaluation

    def poll(self) -> bool:
        """Report the evaluation lines written since the last call; True if there were any."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return False
        if size == self.size:
            return False
        if size < self.offset:  # rewritten (a resumed run drops lines after its checkpoint)
            self.offset = 0
        with open(self.path, "rb") as f:  # bytes: offsets are file positions
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being written is read next time
        self.offset += len(complete)
        self.size = size
        reported = False
        for line in complete.decode(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            value = metric_of(record, self.key)
            if value is not None and "step" in record:
                self.last = (int(record["step"]), value)
                self.trial.report(value, int(record["step"]))
                reported = True
        return reported

    def __call__(self, step: int) -> None:
        if self.poll() and self.trial.should_prune():  # asks the storage: only after a new evaluation
            import optuna

            self.trial.set_user_attr("pruned_at_step", self.last[0])
            self.trial.set_user_attr(self.key, self.last[1])
            raise optuna.TrialPruned(f"{self.key} {self.last[1]:.4g} at step {self.last[0]}")


# ---- the study -----------------------------------------------------------------------------------------


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError("ditkit sweep needs Optuna: pip install 'ditkit[sweep]' (or pip install optuna)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def make_sampler(name: str, params: Sequence[Param], *, seed: int, startup_trials: int, source: str) -> Any:
    optuna = _optuna()
    if name == "tpe":
        with warnings.catch_warnings():  # multivariate TPE (Falkner et al. 2018) is marked experimental by Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials, multivariate=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler({p.key: p.grid_values(source) for p in params}, seed=seed)
    raise ConfigError(f"--sampler {name}: use tpe, random or grid")


def make_pruner(name: str, *, startup_trials: int, min_resource: int) -> Any:
    optuna = _optuna()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, min_resource), reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"--pruner {name}: use median, hyperband or none")


def open_study(study_dir: Path, settings: dict[str, Any], *, resume: bool, storage: Optional[str], sampler: Any,
               pruner: Any, direction: str, study_name: Optional[str] = None) -> Any:
    """Create (or with ``resume``, load or create) the study: ``STUDY_DIR/study.db`` unless
    ``storage`` names a database URL. ``settings`` (what defines the study: base config, space,
    metric) go to ``STUDY_DIR/sweep.json``; resuming with other settings is refused."""
    optuna = _optuna()
    study_dir.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(study_dir / STUDY_FILE).resolve()}"
    name = study_name or study_dir.resolve().name
    settings_path = study_dir / SETTINGS_FILE
    if settings_path.is_file():
        saved = json.loads(settings_path.read_text())
        if not resume:
            raise ConfigError(f"{study_dir} already holds a study: continue it with --resume, or pick another --study-dir")
        for field in ("mode", "space", "metric", "base_config", "checkpoint"):
            if saved.get(field) != settings.get(field):
                what = field.replace("_", " ")
                if field == "base_config":
                    ours, theirs = _flat(settings[field]), _flat(saved[field])
                    key = next(k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k))
                    what = f"{key} ({ours.get(key)!r}, started with {theirs.get(key)!r})"
                raise ConfigError(f"cannot resume {study_dir} with another {what} than it was started "
                                  f"with ({SETTINGS_FILE}): use the same flags, or a new --study-dir")
    else:
        write_text(settings_path, json.dumps(settings, indent=2) + "\n")
    # Optuna 4.9+ names the retry callback RetryHeartbeatStaleTrialCallback (older: RetryFailedTrialCallback)
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    with warnings.catch_warnings():  # heartbeats and the retry callback are marked experimental by Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        stale = {"heartbeat_stale_trial_callback": retry(max_retry=1)} if retry is not None else {
            "failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=1)}
        rdb = optuna.storages.RDBStorage(
            url, heartbeat_interval=HEARTBEAT_INTERVAL_S, grace_period=GRACE_PERIOD_S, **stale,
            engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None,
        )
    return optuna.create_study(study_name=name, storage=rdb, sampler=sampler, pruner=pruner, direction=direction,
                               load_if_exists=True)


def _flat(config: Mapping[str, Any]) -> dict[str, Any]:
    return {f"{section}.{k}": v for section, values in config.items() if isinstance(values, Mapping) for k, v in values.items()}


def _finished_count(study: Any) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def _optimize(study: Any, objective: Callable[[Any], float], trials: int, log: Callable[[str], None]) -> None:
    """Run trials until ``trials`` have completed or been pruned in the whole study (several
    workers share the count through the storage). A trial whose config turns out invalid, or whose
    loss becomes NaN, is failed and the sweep goes on."""
    optuna = _optuna()
    from ditkit.train.loop import NonFiniteLossError

    remaining = trials - _finished_count(study)
    if remaining <= 0:
        log(f"the study already has {_finished_count(study)} finished trials (--trials {trials}): nothing to run")
        return
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    study.optimize(objective, n_trials=remaining, catch=(ConfigError, NonFiniteLossError),
                   callbacks=[optuna.study.MaxTrialsCallback(trials, states=states), _log_trial(log)])


def _log_trial(log: Callable[[str], None]) -> Callable[[Any, Any], None]:
    def callback(study: Any, trial: Any) -> None:
        value = "-" if trial.value is None else f"{trial.value:.4g}"
        extra = trial.user_attrs.get("error") or (f"pruned at step {trial.user_attrs['pruned_at_step']}"
                                                  if "pruned_at_step" in trial.user_attrs else "")
        best = ""
        try:
            best = f"; best so far #{study.best_trial.number} {study.best_value:.4g}"
        except ValueError:
            pass
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
        log(f"trial {trial.number} {trial.state.name.lower()}: {value} {extra} ({params}){best}")
    return callback


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ---- sweeps over training -----------------------------------------------------------------------------


def trial_config(base: Config, params: Mapping[str, Any], run_dir: Path) -> Config:
    """The config of one trial: ``base`` with the trial's values, writing to ``run_dir``."""
    cfg = apply_overrides(base, dict(params))
    cfg.run.results_dir, cfg.run.run_name = str(run_dir.parent), run_dir.name
    return cfg


def sweep_base_config(cfg: Config, *, budget: Optional[str], eval_every: Optional[int], eval_samples: Optional[int],
                      log: Callable[[str], None] = print) -> Config:
    """The base config of a training sweep: the time budget per trial, evaluation every
    ``eval_every`` steps (default: the config's; else a quarter of ``max_steps``, or
    ``DEFAULT_EVAL_EVERY_WITH_BUDGET`` with a budget), a checkpoint at every evaluation."""
    cfg = Config.from_dict(cfg.to_dict())
    t = cfg.train
    if budget is not None:
        t.time_budget = budget
    if eval_every is not None:
        t.eval_every = eval_every
    elif not t.eval_every:
        t.eval_every = DEFAULT_EVAL_EVERY_WITH_BUDGET if t.time_budget else max(1, (t.max_steps or 400) // 4)
        log(f"evaluating every {t.eval_every} steps (set --eval-every to change)")
    if eval_samples is not None:
        t.eval_samples = eval_samples
    t.ckpt_every = t.eval_every  # a pruned trial keeps the checkpoint it was judged on
    t.keep_best = False
    return cfg


def run_training_sweep(
    base: Config,
    params: Sequence[Param],
    study_dir: str | Path,
    *,
    trials: int,
    metric: str = "fd",
    sampler: str = "tpe",
    pruner: str = "median",
    resume: bool = False,
    storage: Optional[str] = None,
    seed: int = 0,
    startup_trials: Optional[int] = None,
    study_name: Optional[str] = None,
    include_base: bool = False,
    source: str = "search space",
    log: Callable[[str], None] = print,
) -> Any:
    """Search ``params`` over training runs of ``base`` (already given its budget and evaluation,
    see ``sweep_base_config``) and return the Optuna study. Each trial trains in
    ``study_dir/trials/trial_NNNN``; its value is ``metric`` at the end of training.
    ``include_base``: a new study's first trial is ``base``'s own values (the recipe as given), so
    the report compares the search with it at the same budget."""
    from ditkit.train.loop import preflight

    study_dir = Path(study_dir)
    preflight(base)
    check_space(params, base, source=source)
    key, direction = resolve_metric(metric, base.modality)
    if not base.train.eval_every:
        raise ConfigError("a training sweep evaluates its trials: set --eval-every N")
    queued = base_values(params, base, source) if include_base else None
    startup = startup_trials if startup_trials is not None else max(2, min(10, trials // 4))
    settings = {"mode": "train", "metric": metric, "space": [dataclasses.asdict(p) for p in params],
                "base_config": base.to_dict(), "checkpoint": None}
    study = open_study(study_dir, json.loads(json.dumps(settings)), resume=resume, storage=storage, direction=direction,
                       study_name=study_name, sampler=make_sampler(sampler, params, seed=seed, startup_trials=startup, source=source),
                       pruner=make_pruner(pruner, startup_trials=startup, min_resource=base.train.eval_every))
    if queued is not None and not study.trials:
        study.enqueue_trial(queued, user_attrs={"base": True})

    def objective(trial: Any) -> float:
        values = {p.key: p.suggest(trial) for p in params}
        run_dir, resume_from = _trial_run_dir(study, trial, study_dir)
        trial.set_user_attr("run_dir", str(run_dir))
        try:
            cfg = trial_config(base, values, run_dir)
            preflight(cfg)  # a combination of values that cannot work fails this trial only
        except ConfigError as err:
            trial.set_user_attr("error", str(err))
            raise
        return _train_trial(study, trial, cfg, values, run_dir, resume_from, key, log)

    _optimize(study, objective, trials, log)
    return study


def base_values(params: Sequence[Param], base: Config, source: str = "search space") -> dict[str, Any]:
    """The values ``base`` has for the searched keys; ``ConfigError`` if one lies outside the space."""
    values = {}
    for p in params:
        section, name = p.key.split(".", 1)
        value = getattr(getattr(base, section), name)
        inside = value in p.choices if p.kind == "categorical" else (
            isinstance(value, (int, float)) and p.low <= value <= p.high)
        if not inside:
            raise ConfigError(f"--include-base: the base config has {p.key}={value!r}, outside {source}'s "
                              f"{p.describe()}: widen the space to include it")
        values[p.key] = value
    return values


def _trial_run_dir(study: Any, trial: Any, study_dir: Path) -> tuple[Path, Optional[Path]]:
    """``(run directory, run to continue or None)``: a trial retried after its process died, or
    queued again after Ctrl-C, continues the earlier trial's run from its newest checkpoint."""
    from ditkit.train.checkpoint import latest_checkpoint

    # a retry copies the failed trial's user attributes (its run_dir); a re-queued trial names its run
    earlier = trial.user_attrs.get("continue_run") or trial.user_attrs.get("run_dir")
    if earlier is not None and latest_checkpoint(Path(earlier)) is not None:
        return Path(earlier), Path(earlier)
    return study_dir / TRIALS_DIR / f"trial_{trial.number:04d}", None


def _train_trial(study: Any, trial: Any, cfg: Config, values: Mapping[str, Any], run_dir: Path,
                 resume_from: Optional[Path], key: str, log: Callable[[str], None]) -> float:
    from ditkit.train.loop import NonFiniteLossError, train

    run_dir.mkdir(parents=True, exist_ok=True)
    watcher = _EvalWatcher(run_dir / "metrics.jsonl", key, trial)
    continuing = f", continuing {resume_from}" if resume_from is not None else ""
    log(f"trial {trial.number}: {', '.join(f'{k}={_fmt(v)}' for k, v in values.items())} -> {run_dir}{continuing}")
    with open(run_dir / "train.log", "a") as log_file:
        def trial_log(message: str) -> None:
            log_file.write(message + "\n")
            log_file.flush()

        try:
            result = train(cfg, resume=resume_from, on_step=watcher, log=trial_log)
        except NonFiniteLossError as err:
            trial.set_user_attr("error", str(err))
            raise
        watcher.poll()  # the evaluation written at the last step (after the last on_step call)
        for name, value in (("steps", result.step), ("train_s", round(result.train_s, 1)),
                            ("stop_reason", result.stop_reason)):
            trial.set_user_attr(name, value)
        if result.interrupted:  # Ctrl-C: the run saved a checkpoint; queue the same values to continue it
            study.enqueue_trial(dict(values), user_attrs={"continue_run": str(run_dir)}, skip_if_exists=False)
            trial.set_user_attr("error", "interrupted (queued again: --resume continues it)")
            raise KeyboardInterrupt
        if watcher.last is not None and watcher.last[0] == result.step:
            value = watcher.last[1]
        else:  # stopped by the time budget between evaluations: score the final checkpoint
            value = _final_evaluation(cfg, run_dir, key, trial_log)
        trial.set_user_attr(key, value)
        return value


def _final_evaluation(cfg: Config, run_dir: Path, key: str, log: Callable[[str], None]) -> float:
    """``key`` of the final checkpoint of ``run_dir``, sampled with the run's ``sample`` settings
    and ``train.eval_samples`` samples (what its periodic evaluation does)."""
    if cfg.modality == "text":
        raise ConfigError(f"{run_dir}: the run ended between evaluations; for text sweeps set --eval-every to divide "
                          "the run length, or use train.max_steps instead of a time budget")
    from ditkit.eval.model_eval import build_evaluator, evaluate_generator
    from ditkit.pipelines.image import ImagePipeline

    pipe = ImagePipeline.from_checkpoint(run_dir, device=cfg.train.device, precision="fp32")
    evaluator = build_evaluator(pipe.cfg, device=pipe.device)
    results = evaluate_generator(pipe, evaluator, cfg.train.eval_samples, seed=cfg.sample.seed, allow_untrained_uncond=True)
    value = metric_of(results["metrics"], key)
    log(f"final evaluation at step {pipe.step}: {key} {value}")
    if value is None:
        raise ConfigError(f"{run_dir}: the final evaluation gave no finite {key}")
    return value


# ---- sweeps over sampling options of a finished run --------------------------------------------------------


def run_sampling_sweep(
    ckpt: str | Path,
    params: Sequence[Param],
    study_dir: str | Path,
    *,
    trials: int,
    metric: str = "fd",
    num_samples: int = 500,
    sampler: str = "tpe",
    resume: bool = False,
    storage: Optional[str] = None,
    seed: int = 0,
    sample_seed: Optional[int] = None,
    startup_trials: Optional[int] = None,
    study_name: Optional[str] = None,
    device: str = "auto",
    precision: str = "fp32",
    batch_size: int = 250,
    include_base: bool = False,
    source: str = "search space",
    log: Callable[[str], None] = print,
) -> Any:
    """Search sampling options (``SAMPLE_KEYS``) on one checkpoint without retraining: each trial
    draws ``num_samples`` images through ``evaluate_generator`` (fixed seeds: trials differ only by
    their options) and scores them. ``include_base``: the first trial is the checkpoint's own
    ``sample`` settings. Returns the study."""
    from ditkit.eval.evaluator import write_results_json
    from ditkit.eval.model_eval import build_evaluator, evaluate_generator
    from ditkit.pipelines.image import ImagePipeline

    study_dir = Path(study_dir)
    outside = [p.key for p in params if p.key not in SAMPLE_KEYS]
    if outside:
        raise ConfigError(f"{source}: {', '.join(outside)} needs retraining; a --ckpt sweep searches only "
                          f"{', '.join(SAMPLE_KEYS)} (sweep training keys with --recipe/--config)")
    if num_samples < 10:
        raise ConfigError(f"--num-samples {num_samples}: use at least 10 (500-1000 gives stable numbers)")
    from ditkit.checkpoint_io import Checkpoint

    checkpoint = Checkpoint.open(ckpt)
    if checkpoint.config.modality != "image":
        raise ConfigError("a --ckpt sweep searches the sampling options of image models")
    key, direction = resolve_metric(metric, "image")
    pipe = ImagePipeline.from_checkpoint(checkpoint, device=device, precision=precision)

    def options(values: Mapping[str, Any]) -> dict[str, Any]:
        return {k.split(".", 1)[1]: v for k, v in values.items()}

    def check(cfg: Config) -> None:  # the pipeline's own checks of one probe value
        s = cfg.sample
        sampler_name, steps, scale, _ = pipe.check_options(s.sampler, s.num_sampling_steps, s.cfg_scale, s.timestep_spacing)
        pipe.check_guidance(scale)

    check_space(params, pipe.cfg, source=source, check=check)
    queued = base_values(params, pipe.cfg, source) if include_base else None
    startup = startup_trials if startup_trials is not None else max(2, min(10, trials // 4))
    settings = {"mode": "sample", "metric": metric, "space": [dataclasses.asdict(p) for p in params],
                "base_config": pipe.cfg.to_dict(), "checkpoint": str(checkpoint.dir.resolve()), "num_samples": num_samples}
    study = open_study(study_dir, json.loads(json.dumps(settings)), resume=resume, storage=storage, direction=direction,
                       study_name=study_name, sampler=make_sampler(sampler, params, seed=seed, startup_trials=startup, source=source),
                       pruner=make_pruner("none", startup_trials=0, min_resource=1))
    if queued is not None and not study.trials:
        study.enqueue_trial(queued, user_attrs={"base": True})
    evaluator = build_evaluator(pipe.cfg, device=pipe.device)
    seed_of_samples = pipe.cfg.sample.seed if sample_seed is None else sample_seed

    def objective(trial: Any) -> float:
        values = {p.key: p.suggest(trial) for p in params}
        out_dir = study_dir / TRIALS_DIR / f"trial_{trial.number:04d}"
        trial.set_user_attr("run_dir", str(out_dir))
        try:
            check(apply_overrides(pipe.cfg, values))
        except ConfigError as err:
            trial.set_user_attr("error", str(err))
            raise
        t0 = time.time()
        results = evaluate_generator(pipe, evaluator, num_samples, seed=seed_of_samples, batch_size=batch_size,
                                     **options(values))
        write_results_json(results, out_dir / "eval.json")
        for name, value in results["metrics"].items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                trial.set_user_attr(name, float(value))
        trial.set_user_attr("seconds", round(time.time() - t0, 1))
        value = metric_of(results["metrics"], key)
        if value is None:
            raise ConfigError(f"trial {trial.number}: the evaluation gave no finite {key}")
        return value

    _optimize(study, objective, trials, log)
    return study


# ---- the report -------------------------------------------------------------------------------------------


def write_report(study: Any, study_dir: str | Path, *, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Write the report of ``study`` into ``study_dir``: ``trials.csv`` and ``report.md`` (a table of
    every trial), ``best.json`` and ``best_config.json`` (the best trial's config for ``ditkit train
    --config``; training sweeps), and plots under ``plots/`` (PNG with matplotlib; HTML too when
    plotly is installed). Returns the paths written, by name."""
    from optuna.trial import TrialState

    study_dir = Path(study_dir)
    settings = json.loads((study_dir / SETTINGS_FILE).read_text())
    written: dict[str, Path] = {}
    trials = study.get_trials(deepcopy=False)
    param_keys = [p["key"] for p in settings["space"]]
    metric_key = METRICS[settings["metric"]][0]
    attr_keys = sorted({k for t in trials for k in t.user_attrs} - {"run_dir", "error", "continue_run", "failed_trial",
                                                                    "retry_history", "pruned_at_step", metric_key})
    header = ["trial", "state", "value", *param_keys, "pruned_at_step", *attr_keys, "run_dir", "error"]
    retried_as = {t.system_attrs["failed_trial"]: t.number for t in trials if "failed_trial" in t.system_attrs}
    rows = []
    for t in trials:
        error = t.user_attrs.get("error")
        if t.state == TrialState.FAIL and error is None:  # failed by the storage: its heartbeat stopped
            error = "its process stopped (no heartbeat)" + (f"; retried as trial {retried_as[t.number]}"
                                                           if t.number in retried_as else "")
        rows.append([t.number, t.state.name.lower(), t.value, *(t.params.get(k) for k in param_keys),
                     t.user_attrs.get("pruned_at_step"), *(t.user_attrs.get(k) for k in attr_keys),
                     t.user_attrs.get("run_dir"), error])
    with atomic_path(study_dir / "trials.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    written["trials.csv"] = study_dir / "trials.csv"

    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = study.best_trial if complete else None
    lines = [f"# Sweep {study.study_name}", "",
             f"Metric: `{metric_key}` ({study.direction.name.lower()}), mode: {settings['mode']}"
             + (f" on `{settings['checkpoint']}`" if settings.get("checkpoint") else "") + ".",
             f"Trials: {len(complete)} complete, {sum(t.state == TrialState.PRUNED for t in trials)} pruned, "
             f"{sum(t.state == TrialState.FAIL for t in trials)} failed, "
             f"{sum(t.state == TrialState.RUNNING for t in trials)} running.", ""]
    if best is not None:
        best_record = {"trial": best.number, "value": best.value, "metric": metric_key, "params": best.params,
                       "run_dir": best.user_attrs.get("run_dir")}
        write_text(study_dir / "best.json", json.dumps(best_record, indent=2) + "\n")
        written["best.json"] = study_dir / "best.json"
        lines += [f"## Best: trial {best.number}, {metric_key} = {best.value:.4g}", ""]
        lines += [f"- `{k}` = `{_fmt(v)}`" for k, v in best.params.items()]
        based = [t for t in complete if t.user_attrs.get("base")]
        if based:
            same = "at the same budget" if settings["mode"] == "train" else "with the same samples"
            lines += ["", f"The base config's own values (trial {based[0].number}): {metric_key} = {based[0].value:.4g} "
                      f"{same}."]
        if settings["mode"] == "train":
            base = Config.from_dict(settings["base_config"])
            cfg = apply_overrides(base, best.params)
            cfg.run = base.run.__class__()  # a fresh run: default results dir, a new numbered name
            write_text(study_dir / "best_config.json", cfg.to_json())
            written["best_config.json"] = study_dir / "best_config.json"
            lines += ["", f"Its run: `{best.user_attrs.get('run_dir')}`. Train it again (same budget): "
                      f"`ditkit train --config {study_dir / 'best_config.json'}`", ""]
        else:
            flags = {"sample.sampler": "--sampler", "sample.num_sampling_steps": "--num-sampling-steps",
                     "sample.cfg_scale": "--cfg-scale", "sample.timestep_spacing": "--timestep-spacing",
                     "sample.guide_channels": "--guide-channels"}
            args = " ".join(f"{flags[k]} {v}" for k, v in best.params.items())
            lines += ["", f"Sample with it: `ditkit sample --ckpt {settings['checkpoint']} {args}`", ""]
    lines += ["## All trials", "", "| " + " | ".join(header[:-2]) + " |", "|" + " --- |" * (len(header) - 2)]
    for row in rows:
        lines.append("| " + " | ".join("" if v is None else _fmt(v) for v in row[:-2]) + " |")
    errors = [(row[0], row[-1]) for row in rows if row[-1]]
    if errors:
        lines += ["", "Failed trials:", ""] + [f"- trial {n}: {e}" for n, e in errors]
    plots = _write_plots(study, study_dir / "plots", log)
    written.update(plots)
    if plots:
        lines += ["", "## Plots", ""] + [f"- [{name}](plots/{name})" for name in sorted(plots)]
    lines += ["", "Resume or add workers: the same command with `--resume`. Browse the study: "
              f"`optuna-dashboard sqlite:///{study_dir / STUDY_FILE}`", ""]
    write_text(study_dir / "report.md", "\n".join(lines))
    written["report.md"] = study_dir / "report.md"
    return written


def _write_plots(study: Any, out: Path, log: Callable[[str], None]) -> dict[str, Path]:
    """Optimisation history, parameter importances and parallel coordinates as PNG (Optuna's
    matplotlib module) and, with plotly installed, as HTML (one shared plotly.min.js beside them).
    A plot that needs more trials than there are is left out with a note."""
    import warnings

    from optuna.trial import TrialState

    written: dict[str, Path] = {}
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return written
    out.mkdir(parents=True, exist_ok=True)
    varied = [k for k in complete[0].params if len({repr(t.params.get(k)) for t in complete}) > 1]
    names = ["optimization_history", "parallel_coordinate"]
    if len(complete) >= 2 and varied:
        names.insert(1, "param_importances")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import optuna.visualization.matplotlib as vis_mpl
    except ImportError:
        vis_mpl = None
        log("matplotlib not installed: no PNG plots (pip install matplotlib)")
    try:
        import optuna.visualization as vis_html

        if not vis_html.is_available():
            vis_html = None
    except ImportError:
        vis_html = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib module experimental
        for name in names:
            if vis_mpl is not None:
                try:
                    ax = getattr(vis_mpl, f"plot_{name}")(study)
                    figure = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
                    figure.set_size_inches(9, 5.5)
                    figure.tight_layout()
                    figure.savefig(out / f"{name}.png", dpi=110)
                    plt.close(figure)
                    written[f"{name}.png"] = out / f"{name}.png"
                except Exception as err:  # noqa: BLE001 - a plot is a convenience; say why it is missing
                    log(f"plot {name}.png skipped: {err}")
            if vis_html is not None:
                try:
                    fig = getattr(vis_html, f"plot_{name}")(study)
                    fig.write_html(str(out / f"{name}.html"), include_plotlyjs="directory")
                    written[f"{name}.html"] = out / f"{name}.html"
                except Exception as err:  # noqa: BLE001
                    log(f"plot {name}.html skipped: {err}")
    return written
