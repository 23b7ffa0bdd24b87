"""An InceptionV3 weights file with random values and the real file's keys and shapes.

The pt_inception-2015-12-05 weights cannot be downloaded here, so tests (and
benchmarks/inception_agreement.py) build torch-fidelity's own network, initialise it so that
activations keep unit scale through its 94 convolutions (He-normal convolutions, identity batch
norms, a small-variance fc), and save its state dict. The real network code then runs on it.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from unittest import mock

import torch

from ditkit.eval.inception import torch_fidelity_inception_class


def write_random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """Save a random state dict for torch-fidelity's FeatureExtractorInceptionV3 at `path`."""
    cls = torch_fidelity_inception_class()
    module = sys.modules[cls.__module__]
    # Build the layers without the weight loading (which would download): no file exists yet.
    with mock.patch.object(module, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(cls, "load_state_dict", lambda self, state: None):
        model = cls("inception-v3-compat", ["2048"])
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("conv.weight"):  # (out, in, kh, kw): He-normal keeps the ReLU stack at unit scale
            fan_in = tensor[0].numel()
            value = torch.randn(tensor.shape, generator=generator) * math.sqrt(2.0 / fan_in)
        elif name == "fc.weight":  # (1008, 2048)
            value = torch.randn(tensor.shape, generator=generator) / math.sqrt(tensor.shape[1])
        elif name == "fc.bias":
            value = torch.zeros_like(tensor)
        else:  # batch-norm weight/bias/running stats keep their identity defaults
            value = tensor.clone()
        state[name] = value.float() if value.is_floating_point() else value
    path = Path(path)
    torch.save(state, path)
    return path
