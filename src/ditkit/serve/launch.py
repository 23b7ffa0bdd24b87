"""Load the operator's checkpoints and run the server (``ditkit serve``)."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from ditkit.checkpoint_io import Checkpoint
from ditkit.config import ConfigError
from ditkit.pipelines import load
from ditkit.serve.models import ImageModel, ServeLimits, model_name_for, parse_ckpt_arg, parse_lora_arg
from ditkit.serve.text import TextModel

__all__ = ["load_models", "run_server"]


def load_models(
    ckpts: Sequence[str], *, device: str = "auto", precision: str = "auto", use_ema: bool = True,
    loras: Sequence[str] = (),
) -> list[ImageModel | TextModel]:
    """One served model per ``--ckpt`` (``PATH`` or ``NAME=PATH``; a run directory serves its newest
    checkpoint). Image or text is read from each checkpoint's config. Every path is checked
    before any weights are loaded. ``loras``: ``NAME=PATH[:WEIGHT]`` adapters, loaded once into
    every image model whose base they fit (a request picks one by name); one that fits none is an
    error naming why."""
    lora_plan = [parse_lora_arg(arg) for arg in loras]
    if not ckpts:
        raise ConfigError("nothing to serve: pass --ckpt RUN_OR_CKPT (one or more)")
    plan = []
    for arg in ckpts:
        name, path = parse_ckpt_arg(arg)
        checkpoint = Checkpoint.open(path)
        plan.append((name or model_name_for(checkpoint.dir), checkpoint))
    names = [name for name, _ in plan]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"two checkpoints would be served as {name!r}: name them with --ckpt NAME=PATH")
    from ditkit.serve.audio import AudioModel
    from ditkit.serve.video import VideoModel

    adapters = {"image": ImageModel, "text": TextModel, "audio": AudioModel, "video": VideoModel}  # what each modality's pipeline is served as
    models: list[ImageModel | TextModel] = []
    for name, checkpoint in plan:
        modality = checkpoint.config.modality
        if modality not in adapters:
            raise ConfigError(f"--ckpt {checkpoint.dir}: serving {modality} models is not supported yet")
        models.append(adapters[modality](name, load(checkpoint, use_ema=use_ema, device=device, precision=precision)))
    for lora_name, path, weight in lora_plan:
        errors = []
        for model in models:
            if not isinstance(model, ImageModel) or model.modality != "image":
                continue
            try:
                model.add_lora(lora_name, path, weight)
            except ConfigError as err:
                errors.append(err)
        if not any(lora_name in m.loras for m in models if isinstance(m, ImageModel)):
            raise errors[0] if errors else ConfigError(f"--lora {lora_name}={path}: no image model is served to load it into")
    return models


def run_server(
    ckpts: Sequence[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: ServeLimits = ServeLimits(),
    device: str = "auto",
    precision: str = "auto",
    use_ema: bool = True,
    log_level: str = "info",
    blocklist: Optional[str] = None,
    loras: Sequence[str] = (),
) -> None:
    """Load ``ckpts`` and serve them until interrupted (Ctrl-C). ``blocklist``: the operator's
    rules file (``ditkit.safety``); without one the filter is on with an empty list."""
    try:
        import uvicorn

        from ditkit.serve.app import create_app
    except ImportError as err:
        raise ConfigError(f"ditkit serve needs FastAPI and uvicorn ({err}): pip install 'ditkit[serve]'") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: use 0..65535")
    from ditkit.safety import Blocklist

    rules = Blocklist.from_file(blocklist) if blocklist is not None else Blocklist()  # checked before loading
    models = load_models(ckpts, device=device, precision=precision, use_ema=use_ema, loras=loras)
    app = create_app(models, limits, blocklist=rules)
    print(f"safety blocklist: {len(rules)} rules" + (f" from {blocklist}" if blocklist else
          " (empty; --blocklist FILE adds rules, see docs/serve.md)"), file=sys.stderr)
    for model in models:
        print(f"serving {model.name!r} ({model.modality}) from {model.ckpt_dir}", file=sys.stderr)
    print(f"open http://{host}:{port}/ (API docs at /docs)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
