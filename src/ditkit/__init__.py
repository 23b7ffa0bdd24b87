"""ditkit: Diffusion Transformers for images and text.

Rooms (see docs/architecture.md):
  models/     plain nn.Module networks, forward(x, t, y) -> tensor; know nothing about noise
  diffusion/  objectives: loss(model, x0, cond) -> per-sample loss, plus a denoiser adapter
  samplers/   pure functions (denoiser, x, schedule, *, generator, callback) -> x0
  data/ train/ eval/ interop/ serve/ cli.py compose the above
"""

__version__ = "0.1.0"
