"""An attribute judge for text-to-image models on ``shapes_captions``, scored GenEval-style.

GenEval (Ghosh et al. 2023, arXiv 2310.11513) checks generated images with an object detector:
a prompt succeeds when the right number of objects is there with the asked colours and positions.
Here the detector is small and trained locally on rendered scenes (no download), so its own error
is measured too (``judge_on_real``: the same scoring on real renders of the prompts).

The judge (``AttributeJudge``) is a CNN that predicts, for each 8x8-pixel cell of the image (4 x 4
at 32 px), whether an object's centre lies in it, and that object's shape, colour, size and centre
offset (a one-stage detector in the manner of YOLO, Redmon et al. 2016). Two objects of a scene
never share a cell (``shapes_captions`` keeps their centres more than one cell apart along the
relation axis).

Scoring a prompt (its scene record: objects with shape / colour / size, an optional relation):
the detections are matched to the prompt's objects (the assignment that agrees on most
attributes); **success** needs the object count, every attribute of every object and the relation
(compared on the matched centres) right. Per-axis accuracies: count (per prompt), shape, colour,
size (per object), relation (per two-object prompt). Reported separately for in-distribution
prompts (train split grammar) and held-out combinations. "FD (judge features)" is the Fréchet
distance between the judge's pooled features of generated and real images, beside its floor: the
same distance between two independent real sets of the same size (not FID: no Inception network).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ditkit.data.captions import COLOURS, SHAPES, SIZES, shapes_captions
from ditkit.eval.frechet import feature_stats, frechet_distance
from ditkit.fileio import atomic_path, write_text

__all__ = [
    "AttributeJudge", "train_judge", "load_or_train_judge", "detect", "score_prompt", "score_images",
    "evaluate_text_to_image", "eval_scenes", "FD_NAME", "cmd_eval_text_to_image", "CLIPScorer", "CLIP_NOT_REPORTED",
]

FD_NAME = "FD (judge features)"
_COLOURS, _SIZES = list(COLOURS), list(SIZES)
CELL = 8  # pixels per detector cell at every image size (the scenes scale with the image)
_HEADS = (1, len(SHAPES), len(_COLOURS), len(_SIZES), 2)  # objectness, shape, colour, size, centre offset


class AttributeJudge(nn.Module):
    """(B, 3, S, S) in [-1, 1] -> (B, 15, S/8, S/8) per-cell predictions; ``features`` (B, 4 * width)."""

    def __init__(self, width: int = 16):
        super().__init__()

        def stage(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GELU(), nn.Conv2d(c_out, c_out, 3, padding=1),
                                 nn.GELU(), nn.MaxPool2d(2))

        self.body = nn.Sequential(stage(3, width), stage(width, 2 * width), stage(2 * width, 4 * width))
        self.head = nn.Conv2d(4 * width, sum(_HEADS), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled last-stage features (B, 4 * width): what "FD (judge features)" compares."""
        return self.body(x).mean(dim=(2, 3))


def _targets(records: Sequence[dict[str, Any]], size: int) -> dict[str, torch.Tensor]:
    """Per-cell training targets of scene records: obj (B, g, g) float, shape/colour/size (B, g, g)
    int64 (-1 where no object), offset (B, 2, g, g) in [0, 1]."""
    g = size // CELL
    b = len(records)
    obj = torch.zeros(b, g, g)
    labels = {k: torch.full((b, g, g), -1, dtype=torch.long) for k in ("shape", "colour", "size")}
    offset = torch.zeros(b, 2, g, g)
    for i, rec in enumerate(records):
        for o in rec["objects"]:
            cx, cy = min(int(o["x"] // CELL), g - 1), min(int(o["y"] // CELL), g - 1)
            obj[i, cy, cx] = 1
            labels["shape"][i, cy, cx] = SHAPES.index(o["shape"])
            labels["colour"][i, cy, cx] = _COLOURS.index(o["colour"])
            labels["size"][i, cy, cx] = _SIZES.index(o["size"])
            offset[i, 0, cy, cx] = o["x"] / CELL - cx
            offset[i, 1, cy, cx] = o["y"] / CELL - cy
    return {"obj": obj, **labels, "offset": offset}


def _judge_loss(pred: torch.Tensor, target: dict[str, torch.Tensor]) -> torch.Tensor:
    obj, shape, colour, size, offset = pred.split(_HEADS, dim=1)
    loss = F.binary_cross_entropy_with_logits(obj[:, 0], target["obj"])
    for logits, key in ((shape, "shape"), (colour, "colour"), (size, "size")):
        loss = loss + F.cross_entropy(logits, target[key], ignore_index=-1)
    mask = target["obj"][:, None]
    return loss + ((offset.sigmoid() - target["offset"]) ** 2 * mask).sum() / mask.sum().clamp_min(1)


def train_judge(
    image_size: int = 32, num_items: int = 4000, steps: int = 800, batch_size: int = 96, seed: int = 123,
    log: Callable[[str], None] = lambda m: None,
) -> AttributeJudge:
    """Train a judge on ``num_items`` rendered scenes of every combination (held-out ones included:
    the judge must recognise them). Deterministic for a seed."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        judge = AttributeJudge()
    data = shapes_captions(num_items, seed=seed, split="all", image_size=image_size, num_captions=1)
    images, targets = data.pixels(), _targets(data.records, image_size)
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    judge.train()
    for step in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=g)
        loss = _judge_loss(judge(images[idx]), {k: v[idx] for k, v in targets.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 250 == 0:
            log(f"attribute judge: step {step + 1}/{steps} loss {loss.item():.4f}")
    return judge.eval()


def load_or_train_judge(
    cache_dir: Optional[str | Path] = None, image_size: int = 32, log: Callable[[str], None] = lambda m: None,
    **train_kwargs: Any,
) -> AttributeJudge:
    """The judge for ``image_size``, trained once and cached under ``cache_dir`` (default
    ``$DITKIT_CACHE_DIR/eval`` or ``~/.cache/ditkit/eval``), keyed by its training settings."""
    import os

    settings = {"image_size": image_size, "version": 2, **train_kwargs}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_dir) if cache_dir else Path(os.environ.get("DITKIT_CACHE_DIR", Path.home() / ".cache" / "ditkit")) / "eval"
    path = root / f"attribute_judge-{key}.pt"
    judge = AttributeJudge()
    if path.is_file():
        judge.load_state_dict(torch.load(path, weights_only=True))
        return judge.eval()
    t0 = time.time()
    judge = train_judge(image_size=image_size, log=log, **train_kwargs)
    with atomic_path(path) as tmp:
        torch.save(judge.state_dict(), tmp)
    log(f"attribute judge trained in {time.time() - t0:.0f} s, cached at {path}")
    return judge


@torch.no_grad()
def detect(judge: AttributeJudge, images: torch.Tensor, threshold: float = 0.1, batch_size: int = 256) -> list[list[dict[str, Any]]]:
    """Objects found in each image (B, 3, S, S) in [-1, 1]: ``[{"shape", "colour", "size", "x", "y"}]``
    per image, centres in pixels. ``threshold`` on the objectness was chosen on real renders kept
    apart from training and evaluation (seed 78, 400 scenes): success 0.90 / 0.93 / 0.95 / 0.97 and
    count accuracy 0.91 / 0.94 / 0.97 / 0.995 at 0.5 / 0.3 / 0.2 / 0.1."""
    found = []
    for lo in range(0, len(images), batch_size):
        pred = judge(images[lo: lo + batch_size].float())
        obj, shape, colour, size, offset = pred.split(_HEADS, dim=1)
        prob, off = obj[:, 0].sigmoid(), offset.sigmoid()
        for i in range(pred.shape[0]):
            objects: list[dict[str, Any]] = []
            cells = sorted((prob[i] > threshold).nonzero().tolist(), key=lambda c: -float(prob[i, c[0], c[1]]))
            for cy, cx in cells:
                objects.append({
                    "shape": SHAPES[int(shape[i, :, cy, cx].argmax())],
                    "colour": _COLOURS[int(colour[i, :, cy, cx].argmax())],
                    "size": _SIZES[int(size[i, :, cy, cx].argmax())],
                    "x": (cx + float(off[i, 0, cy, cx])) * CELL,
                    "y": (cy + float(off[i, 1, cy, cx])) * CELL,
                })
                # one object seen from two cells: keep the surer one (real centres are > 8 px apart)
                if any(abs(o["x"] - objects[-1]["x"]) + abs(o["y"] - objects[-1]["y"]) < 5 for o in objects[:-1]):
                    objects.pop()
            found.append(objects)
    return found


def _relation_holds(a: dict[str, Any], b: dict[str, Any], relation: str) -> bool:
    """Whether detected centre a is ``relation`` centre b (x right, y down)."""
    return {"left of": a["x"] < b["x"], "right of": a["x"] > b["x"], "above": a["y"] < b["y"],
            "below": a["y"] > b["y"]}[relation]


def score_prompt(record: dict[str, Any], found: list[dict[str, Any]]) -> dict[str, Any]:
    """GenEval-style verdict of one image for its prompt's scene record: per-axis booleans (lists
    per object for shape / colour / size; relation None for one object) and ``success``. ``found``
    is ordered surest first; the prompt's objects are matched to the first ``len(objects)``."""
    wanted = record["objects"]
    # only the most confident detections, as many as asked, are matched: a picture full of blobs
    # must not find the right attributes somewhere by chance (``detect`` lists the surest first)
    pool: list[Optional[dict[str, Any]]] = list(found[: len(wanted)]) + [None] * max(0, len(wanted) - len(found))
    matched: list[Optional[dict[str, Any]]] = [None] * len(wanted)
    best_agree = -1
    for chosen in itertools.permutations(range(len(pool)), len(wanted)):
        pick = [pool[j] for j in chosen]
        agree = sum(m is not None and m[k] == w[k] for m, w in zip(pick, wanted) for k in ("shape", "colour", "size"))
        if agree > best_agree:
            matched, best_agree = pick, agree
    axes: dict[str, Any] = {"count": len(found) == len(wanted)}
    for k in ("shape", "colour", "size"):
        axes[k] = [m is not None and m[k] == w[k] for m, w in zip(matched, wanted)]
    relation = record.get("relation")
    axes["relation"] = None
    if relation is not None:
        axes["relation"] = all(m is not None for m in matched) and _relation_holds(matched[0], matched[1], relation)
    axes["success"] = bool(axes["count"] and all(all(axes[k]) for k in ("shape", "colour", "size"))
                           and axes["relation"] in (None, True))
    return axes


def score_images(judge: AttributeJudge, images: torch.Tensor, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-prompt success rate and per-axis accuracies of ``images`` (N, 3, S, S) for ``records``."""
    verdicts = [score_prompt(r, f) for r, f in zip(records, detect(judge, images))]
    per_object = {k: [x for v in verdicts for x in v[k]] for k in ("shape", "colour", "size")}
    relations = [v["relation"] for v in verdicts if v["relation"] is not None]
    one = [v["success"] for v, r in zip(verdicts, records) if r.get("relation") is None]
    two = [v["success"] for v, r in zip(verdicts, records) if r.get("relation") is not None]
    mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
    return {
        "success": mean([v["success"] for v in verdicts]),
        "success_one_object": mean(one),
        "success_two_objects": mean(two),
        "accuracy": {"count": mean([v["count"] for v in verdicts]), **{k: mean(v) for k, v in per_object.items()},
                     "relation": mean(relations)},
        "num_prompts": len(verdicts),
    }


def _fd(a: np.ndarray, b: np.ndarray) -> float:
    return float(frechet_distance(*feature_stats(a), *feature_stats(b)))


def eval_scenes(split: str, num_prompts: int, image_size: int = 32) -> Any:
    """The evaluation prompts of ``split`` ("in_distribution": the training grammar's combinations,
    "held_out": every scene holds a held-out combination): ``shapes_captions`` scenes drawn with
    their own fixed seeds (not the training seed), canonical captions as the prompts."""
    offset = {"in_distribution": 0, "held_out": 1}[split]
    return shapes_captions(num_prompts, seed=10_000 + offset, split="train" if offset == 0 else "held_out",
                           image_size=image_size, num_captions=1)


@torch.no_grad()
def evaluate_text_to_image(
    pipe: Any,
    *,
    num_prompts: int = 200,
    num_inference_steps: Optional[int] = None,
    guidance_scale: Optional[float] = None,
    sampler: Optional[str] = None,
    seed: int = 0,
    batch_size: int = 100,
    judge: Optional[AttributeJudge] = None,
    cache_dir: Optional[str | Path] = None,
    clip_model: Optional[str | Path] = None,
    log: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """Sample one image per prompt for ``num_prompts`` in-distribution and ``num_prompts`` held-out
    scene prompts (canonical captions of ``shapes_captions`` records, seeds fixed), judge them, and
    return the results: success and per-axis accuracy per split, the judge on real renders of the
    same prompts (its ceiling), FD (judge features) with its real-vs-real floor, images/s. With
    ``clip_model`` (a local CLIP folder, ``--clip-model``) also each split's CLIP score and that of the
    real renders (``clip_score``); without it ``"CLIP score"`` says why it is not reported."""
    size = pipe.cfg.data.image_size
    judge = judge or load_or_train_judge(cache_dir, image_size=size, log=log)
    clip = CLIPScorer(clip_model) if clip_model is not None else None  # a bad folder fails before sampling
    results: dict[str, Any] = {"metric_note": f"{FD_NAME}: Fréchet distance in the attribute judge's features, not FID"}
    if clip is None:
        results["CLIP score"] = CLIP_NOT_REPORTED
    gen_all, real_all = [], []
    seconds = 0.0
    for offset, split in ((0, "in_distribution"), (1, "held_out")):
        scenes = eval_scenes(split, num_prompts, size)
        prompts = [r["caption"] for r in scenes.records]
        t0 = time.perf_counter()
        out = pipe(prompts, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, sampler=sampler,
                   seed=seed + 100_000 * offset, batch_size=batch_size)
        seconds += time.perf_counter() - t0
        results[split] = score_images(judge, out.tensors, scenes.records)
        results[split]["judge_on_real"] = score_images(judge, scenes.pixels(), scenes.records)["success"]
        results[split]["seed"] = seed + 100_000 * offset
        if clip is not None:
            results[split]["clip_score"] = clip(out.tensors, prompts)
            results[split]["clip_score_real"] = clip(scenes.pixels(), prompts)
        gen_all.append(judge.features(out.tensors).numpy())
        real_all.append(judge.features(scenes.pixels()).numpy())
        log(f"{split}: success {results[split]['success']:.3f} (judge on real renders {results[split]['judge_on_real']:.3f})")
        results["sampling"] = dict(out.metadata)
    # FD against fresh real scenes of the same mixture; the floor is real vs real of equal size
    gen = np.concatenate(gen_all)
    ref_a = shapes_captions(len(gen), seed=20_000, split="all", image_size=size, num_captions=1).pixels()
    ref_b = shapes_captions(len(gen), seed=20_001, split="all", image_size=size, num_captions=1).pixels()
    feats_a, feats_b = judge.features(ref_a).numpy(), judge.features(ref_b).numpy()
    results[FD_NAME] = _fd(gen, feats_a)
    results[FD_NAME + " real-vs-real floor"] = _fd(feats_b, feats_a)
    results["images_per_second"] = 2 * num_prompts / seconds
    results["num_prompts_per_split"] = num_prompts
    if clip is not None:
        results["CLIP score"] = {"model": str(clip_model), "note": CLIP_NOTE}
    return results


CLIP_NOT_REPORTED = ("not reported: no local CLIP weights given (ditkit eval --clip-model PATH, a local Hugging Face "
                     "CLIP folder; nothing is downloaded)")
CLIP_NOTE = ("torchmetrics CLIPScore: 100 x cosine similarity of CLIP image and text embeddings, clipped at 0 "
             "(Hessel et al. 2021), averaged over the split's prompts; clip_score_real scores real renders of the "
             "same prompts, the reference to read it against")


def _torchmetrics_clip_score() -> type:
    """torchmetrics' ``CLIPScore`` class. torchmetrics imports torch-fidelity when it is installed, and
    torch-fidelity's package ``__init__`` needs torchvision, which CPU machines here lack (ditkit
    installs torch-fidelity with --no-deps, see ``ditkit.eval.inception``). If the plain import fails
    for that reason, torchmetrics is imported again under a stand-in ``torch_fidelity`` package whose
    ``__path__`` is the installed folder, so only the torchvision-free modules it uses load; the
    stand-in is removed afterwards."""
    import importlib
    import importlib.util
    import sys
    import types

    try:
        return importlib.import_module("torchmetrics.multimodal.clip_score").CLIPScore
    except ImportError as error:
        spec = importlib.util.find_spec("torch_fidelity")
        if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("torchmetrics") is None:
            raise ImportError(str(error)) from error
    for name in [m for m in sys.modules if m == "torchmetrics" or m.startswith(("torchmetrics.", "torch_fidelity"))]:
        sys.modules.pop(name)  # the failed import's half-loaded modules
    stand_in = types.ModuleType("torch_fidelity")
    stand_in.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = stand_in
    try:
        return importlib.import_module("torchmetrics.multimodal.clip_score").CLIPScore
    finally:
        sys.modules.pop("torch_fidelity", None)


class _ProjectedFeatures(nn.Module):
    """A ``CLIPModel`` whose ``get_image_features`` / ``get_text_features`` return the projected
    embeddings (N, projection_dim) as tensors: transformers 5 returns an output object (the
    embeddings in ``pooler_output``), which torchmetrics 1.9 does not unpack."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.config = model, model.config

    @staticmethod
    def _tensor(out: Any) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


class CLIPScorer:
    """``scorer(images (N, C, H, W) float in [-1, 1], prompts) -> float``: torchmetrics' ``CLIPScore``
    with the CLIP model and processor of a local folder (``CLIPModel`` / ``CLIPProcessor``,
    ``local_files_only``: never a download). torchmetrics 1.9 accepts only hub names or a callable as
    ``model_name_or_path``, so the folder is passed as a callable that loads it. ConfigError naming
    ``--clip-model`` for a missing folder, one transformers cannot load, or no torchmetrics."""

    def __init__(self, path: str | Path, batch_size: int = 64):
        from ditkit.config import ConfigError

        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise ConfigError(f"--clip-model {path}: not a local Hugging Face CLIP folder (no config.json there)")
        try:
            CLIPScore = _torchmetrics_clip_score()
            from transformers import CLIPModel, CLIPProcessor
        except ImportError as err:
            raise ConfigError(f"--clip-model needs torchmetrics and transformers ({err}): pip install torchmetrics transformers") from None

        def load() -> tuple[Any, Any]:
            return (_ProjectedFeatures(CLIPModel.from_pretrained(str(folder), local_files_only=True)),
                    CLIPProcessor.from_pretrained(str(folder), local_files_only=True))

        try:
            with torch.random.fork_rng(devices=[]):
                self.metric = CLIPScore(model_name_or_path=load)
        except (OSError, ValueError) as err:
            raise ConfigError(f"--clip-model {path}: transformers cannot load it ({str(err).splitlines()[0]})") from None
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> float:
        self.metric.reset()
        pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()  # what the processor takes
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        for lo in range(0, len(prompts), self.batch_size):
            self.metric.update(pixels[lo: lo + self.batch_size], list(prompts[lo: lo + self.batch_size]))
        return float(self.metric.compute())


def cmd_eval_text_to_image(args: Any) -> int:
    """``ditkit eval --ckpt RUN`` for a text-to-image run: ``--num-samples`` prompts per split (in
    distribution, held out), the judge's metrics printed and written as JSON (default
    ``RUN/eval/<checkpoint>-t2i-<sampler>-<steps>-cfg<scale>-n<N>-seed<seed>.json``)."""
    from ditkit.config import ConfigError
    from ditkit.pipelines import load

    if args.num_samples < 10:
        raise ConfigError(f"--num-samples {args.num_samples}: use at least 10 prompts per split (200 gives stable numbers)")
    for attr, flag in (("data", "--data"), ("inception_weights", "--inception-weights"), ("guide_channels", "--guide-channels")):
        if getattr(args, attr, None) is not None:
            raise ConfigError(f"{flag} does not apply to a text-to-image evaluation (the attribute judge scores it)")
    pipe = load(args.ckpt, device=args.device, precision=args.precision, use_ema=not args.no_ema)
    if pipe.cfg.data.dataset != "shapes_captions":
        raise ConfigError("the attribute judge knows the shapes_captions scenes only: this run trained on "
                          f"{pipe.cfg.data.dataset}")
    sampler, steps, scale, _ = pipe.check_options(args.sampler, args.num_sampling_steps, args.cfg_scale, args.timestep_spacing)
    seed = pipe.cfg.sample.seed if args.seed is None else args.seed
    results = evaluate_text_to_image(pipe, num_prompts=args.num_samples, num_inference_steps=steps, guidance_scale=scale,
                                     sampler=sampler, seed=seed, batch_size=args.batch_size, cache_dir=args.cache_dir,
                                     clip_model=getattr(args, "clip_model", None), log=lambda m: print(m, flush=True))
    results["checkpoint"] = str(pipe.checkpoint.dir) if pipe.checkpoint is not None else None
    name = f"{pipe.checkpoint.dir.name}-t2i-{sampler}-{steps}-cfg{scale:g}-n{args.num_samples}-seed{seed}"
    out = Path(args.out) if args.out else pipe.checkpoint.run_dir / "eval" / f"{name}.json"
    write_text(out, json.dumps(results, indent=2, ensure_ascii=False) + "\n")  # nothing written half
    ind, held = results["in_distribution"], results["held_out"]
    print(f"success in-distribution {ind['success']:.3f} | held-out {held['success']:.3f} | {FD_NAME} "
          f"{results[FD_NAME]:.3f} (real-vs-real floor {results[FD_NAME + ' real-vs-real floor']:.3f})")
    print(f"wrote {out}")
    return 0
