"""ditkit: Diffusion Transformers for images and text.

    import ditkit, torch
    pipe = ditkit.load("results/digits")      # the pipeline of the run's modality, loaded once
    out = pipe(class_labels=[1, 2], num_inference_steps=50, guidance_scale=1.25,
               generator=torch.Generator().manual_seed(0))

Rooms (see docs/architecture.md):
  models/     plain nn.Module networks, forward(x, t, y) -> tensor; know nothing about noise
  diffusion/  objectives: loss(model, x0, cond) -> per-sample loss, plus a denoiser adapter
  samplers/   pure functions (denoiser, x, schedule, *, generator, callback) -> x0
  builders/   config -> model, objective; pipelines/ one per modality, on top of the builders
  data/ train/ eval/ interop/ serve/ cli/ compose the above
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load"]


def load(path: Any, **kwargs: Any) -> Any:
    """Load a run or checkpoint into the pipeline of its modality (``ditkit.pipelines.load``):
    ``ditkit.load("results/digits", device="cpu", precision="fp32")``."""
    from ditkit.pipelines import load as _load  # torch is imported on first use, not by `import ditkit`

    return _load(path, **kwargs)
