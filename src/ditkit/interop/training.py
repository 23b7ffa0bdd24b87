"""Training hooks of the interop room, called by ``ditkit.train.loop``:

* ``prepare_latent_data``: ``--vae PATH`` (``data.vae``) -> the VAE, a latent cache of the dataset
  (built once, reused while data, VAE, image size and flips are unchanged; under
  ``ditkit.cache.cache_dir("latents")``) and the config with ``data.latent_channels`` and
  ``data.vae_downsample`` recorded, so the checkpoint alone rebuilds a DiT on latents.
* ``apply_init_from``: ``--init-from RUN_OR_FILE [--class-map ...]`` (``train.init_from``) -> the
  fresh model loaded from pretrained weights (``ditkit.interop.finetune.init_from``), the
  provenance written to ``RUN/init_from.json``. The optimiser is not touched: it starts fresh.
* ``parse_class_map``: the ``--class-map`` text.

Neither hook touches torch's global RNG, so a run's model init and label dropout are the same
with or without them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from ditkit.cache import cache_dir
from ditkit.config import Config, ConfigError
from ditkit.data.images import ImageDataset
from ditkit.data.latents import LatentCache, build_latent_cache
from ditkit.fileio import write_text
from ditkit.interop.finetune import init_from
from ditkit.models.dit import DiT
from ditkit.interop.vae import LatentVAE, load_vae

__all__ = ["INIT_RECORD", "parse_class_map", "prepare_latent_data", "apply_init_from"]

INIT_RECORD = "init_from.json"

ClassMap = Union[dict[int, Optional[int]], list[Optional[int]]]


def parse_class_map(text: Optional[str]) -> Optional[ClassMap]:
    """``--class-map`` text -> ``init_from``'s class map (new class -> source class, None: fresh).

    Accepted: ``"NEW:OLD,NEW:OLD"`` (e.g. ``"0:207,1:360"``; unnamed classes start fresh), a JSON
    object ``{"0": 207}`` or a JSON list ``[207, 360, null]`` (entry i: the source row of class i).
    """
    if text is None or not text.strip():
        return None
    text = text.strip()
    if text[0] in "[{":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"--class-map {text!r} is not valid JSON ({err})") from None
        if isinstance(value, list):
            return [None if v is None else int(v) for v in value]
        return {int(k): None if v is None else int(v) for k, v in value.items()}
    mapping: dict[int, Optional[int]] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        new, sep, old = part.partition(":")
        try:
            if not sep:
                raise ValueError
            mapping[int(new)] = None if old.strip() in ("", "-", "none", "null") else int(old)
        except ValueError:
            raise ConfigError(
                f"--class-map {text!r}: write NEW:OLD pairs, e.g. --class-map 0:207,1:360 (new class 0 starts "
                "from the source's class 207)"
            ) from None
    return mapping


def prepare_latent_data(
    cfg: Config, dataset: ImageDataset, device: torch.device | str = "cpu", log: Callable[[str], None] = print
) -> tuple[Config, LatentCache, LatentVAE]:
    """Load ``cfg.data.vae`` and encode ``dataset`` into the latent cache (or reuse it).

    Returns ``(config with data.latent_channels / data.vae_downsample set, cache, vae)``.
    Raises ConfigError when the image size is not a multiple of the VAE's downsampling.
    """
    if cfg.data.vae is None:
        raise ConfigError("prepare_latent_data needs data.vae (--vae PATH)")
    with torch.random.fork_rng(devices=[]):  # loading a diffusers model may initialise weights randomly
        vae = load_vae(cfg.data.vae, device=device)
    vae.latent_size(cfg.data.image_size)  # raises with the fix when the size does not divide
    if cfg.data.latent_channels not in (None, vae.latent_channels) or cfg.data.vae_downsample not in (None, vae.downsample):
        raise ConfigError(
            f"--vae {cfg.data.vae} has {vae.latent_channels} latent channels and downsamples {vae.downsample}x, but the "
            f"config says {cfg.data.latent_channels} channels at {cfg.data.vae_downsample}x: use the VAE the run started with"
        )
    root = cache_dir("latents")
    cache = build_latent_cache(dataset, vae, root, hflip=cfg.data.hflip)
    what = "clips" if len(cache.latent_shape) == 4 else "images"  # clips: (c, F, h, w), encoded frame by frame
    log(
        f"latents {'reused from' if cache.reused else 'encoded into'} {cache.path}: {len(cache)} {what} -> "
        f"{'x'.join(map(str, cache.latent_shape))} (VAE {vae.path}, scale {vae.scaling_factor:g})"
    )
    resolved = Config.from_dict(cfg.to_dict())
    resolved.data.latent_channels = vae.latent_channels
    resolved.data.vae_downsample = vae.downsample
    return resolved, cache, vae


# Model options that change what a network computes without changing its tensors (keys and shapes
# match either way), with what None means for every family that has them.
_LAYOUT_DEFAULTS = {"pos_embed": "sincos", "attention": "interleaved", "tubelet_size": 1, "timestep_freq_shift": 0.0}


def _check_same_layout(cfg: Config, folder: Path) -> None:
    """ConfigError when the ditkit source in ``folder`` (its ``config.json``) was built with another
    value of an option that leaves the tensors' shapes alone (``_LAYOUT_DEFAULTS``): its weights would
    load and compute something else."""
    path = folder / "config.json"
    if not path.is_file():
        return
    theirs = json.loads(path.read_text(encoding="utf-8")).get("model", {})
    for key, default in _LAYOUT_DEFAULTS.items():
        ours, source = getattr(cfg.model, key, None), theirs.get(key)
        ours, source = default if ours is None else ours, default if source is None else source
        if ours != source:
            raise ConfigError(f"--init-from {folder} was trained with model.{key}={source!r} and this run asks for "
                              f"{ours!r}: its weights would compute something else; use --set model.{key}={source}")


def apply_init_from(
    model: torch.nn.Module, cfg: Config, run_dir: str | Path, log: Callable[[str], None] = print,
    write_record: bool = True,
) -> dict[str, Any]:
    """Load ``cfg.train.init_from`` into the freshly built ``model`` (in place, any device) and write
    the provenance to ``run_dir/init_from.json`` (``write_record``: only rank 0 writes, under
    torchrun). New label rows are drawn from a generator seeded with ``train.seed``, so every rank
    builds the same model. Returns the provenance record."""
    t = cfg.train
    if t.init_from is None:
        raise ConfigError("apply_init_from needs train.init_from (--init-from RUN_OR_FILE)")
    class_map = parse_class_map(t.init_class_map)
    device = next(model.parameters()).device
    model.cpu()  # fresh rows are drawn on the CPU generator, the same on every device
    try:
        record = init_from(model, t.init_from, class_map, generator=torch.Generator().manual_seed(t.seed))
    finally:
        model.to(device)
    if record["kind"] == "ditkit" and not isinstance(model, DiT):
        _check_same_layout(cfg, Path(record["init_from"]))
    if write_record:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(run_dir / INIT_RECORD, json.dumps(record, indent=2) + "\n")
    log(
        f"initialised from {record['init_from']} ({record['kind']}, {record['weights']} weights): "
        f"{record['label_rows_copied']} label rows copied, {record['label_rows_fresh']} fresh, pos_embed "
        f"{record['pos_embed']}; optimiser starts fresh"
    )
    return record
