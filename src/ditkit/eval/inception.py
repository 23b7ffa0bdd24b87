"""Standard Inception FID and IS from a local weights file, through torch-fidelity.

The network is torch-fidelity's `FeatureExtractorInceptionV3` (the TF-compatible InceptionV3 of
the original FID code, pytorch-fid's `pt_inception-2015-12-05` weights). ditkit always hands it
the user's file (`--inception-weights PATH`), so nothing is ever downloaded: torch-fidelity only
downloads when given no path. Before torch-fidelity sees the file, ditkit opens it with
`torch.load(weights_only=True)` and checks it is the expected state dict, so a wrong or
untrusted file fails early and safely.

torch-fidelity is an optional dependency, imported only here. Its InceptionV3 module needs only
torch, but the package's `__init__` imports torchvision (for its datasets and other extractors),
and PyPI's torchvision does not import beside a CPU-only torch build. So when the plain import
fails for want of torchvision, ditkit loads the InceptionV3 module (and the three small modules it
uses) from the installed torch-fidelity without running the package's `__init__`: the same code
and the same numbers, no torchvision. Install it with `pip install --no-deps torch-fidelity` on such
machines (its declared torchvision requirement would pull a CUDA torch).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import torch

PYTORCH_FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
TORCH_FIDELITY_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
FEATURE_EXTRACTOR_NAME = "inception-v3-compat"  # torch-fidelity's name for the TF-compatible InceptionV3
_EXPECTED_SHAPES = {"fc.weight": (1008, 2048), "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3)}


def _where_to_get_weights() -> str:
    return (
        "The file is the InceptionV3 of the original TensorFlow FID code converted to PyTorch, "
        f"released as pt_inception-2015-12-05-6726825d.pth at {PYTORCH_FID_WEIGHTS_URL} "
        f"(the same network torch-fidelity publishes at {TORCH_FIDELITY_WEIGHTS_URL}). "
        "ditkit never downloads it: fetch it yourself on a machine with network access, then pass "
        "--inception-weights /path/to/pt_inception-2015-12-05-6726825d.pth. "
        "Without it, ditkit reports FD in its own classifier features."
    )


def check_inception_weights(path: str | Path) -> Path:
    """Return `path` as a Path if it is a readable file; otherwise raise FileNotFoundError that
    says where the pt_inception-2015-12-05 weights come from."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights not found at '{path}'. {_where_to_get_weights()}")
    return path


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """sha256 (hex) of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _validate_state_dict(path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means "not the right file"
        message = f"could not read '{path}' as a PyTorch state dict ({error}). {_where_to_get_weights()}"
        raise ValueError(message) from error
    if not isinstance(state, dict):
        raise ValueError(f"'{path}' holds a {type(state).__name__}, not a state dict. {_where_to_get_weights()}")
    for key, shape in _EXPECTED_SHAPES.items():
        if key not in state or tuple(state[key].shape) != shape:
            found = tuple(state[key].shape) if key in state else "missing"
            raise ValueError(
                f"'{path}' is not the FID InceptionV3 state dict: '{key}' expected {shape}, got {found}. "
                f"{_where_to_get_weights()}"
            )


def torch_fidelity_inception_class() -> type:
    """torch-fidelity's `FeatureExtractorInceptionV3` class, with or without torchvision.

    The plain import is tried first. If it fails (torchvision missing, or broken beside this torch:
    ImportError or RuntimeError) and torch-fidelity is installed, the
    module is imported under a stand-in `torch_fidelity` package object whose `__path__` is the
    installed package's folder, so `torch_fidelity.feature_extractor_inceptionv3` and its
    torchvision-free dependencies load and the package `__init__` (the torchvision importer) does
    not run. The stand-in is removed again, so a later `import torch_fidelity` behaves as before.
    """
    module_name = "torch_fidelity.feature_extractor_inceptionv3"
    try:
        return importlib.import_module(module_name).FeatureExtractorInceptionV3
    except Exception as error:  # noqa: BLE001 - a broken torchvision raises ImportError or RuntimeError
        spec = importlib.util.find_spec("torch_fidelity")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(
                "Inception FID/IS needs the optional package torch-fidelity: pip install --no-deps "
                "torch-fidelity (with --no-deps, a CPU torch stays; torchvision is not needed)"
            ) from error
    stand_in = types.ModuleType("torch_fidelity")
    stand_in.__path__ = list(spec.submodule_search_locations)
    previous = sys.modules.get("torch_fidelity")
    sys.modules["torch_fidelity"] = stand_in
    try:
        # The failed package import may have left this module bound to the failed package: load it
        # afresh under the stand-in. (Its submodules stay loaded without a parent package, so the
        # class cannot be pickled by reference; nothing in ditkit pickles it.)
        sys.modules.pop(module_name, None)
        return importlib.import_module(module_name).FeatureExtractorInceptionV3
    finally:
        if previous is None:
            sys.modules.pop("torch_fidelity", None)
        else:
            sys.modules["torch_fidelity"] = previous


def torch_fidelity_version() -> str:
    """The torch-fidelity version for result files (its package `__init__` may not be importable)."""
    loaded = sys.modules.get("torch_fidelity")
    if getattr(loaded, "__version__", None):
        return loaded.__version__
    try:
        return importlib.metadata.version("torch-fidelity")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class InceptionExtractor:
    """torch-fidelity InceptionV3 loaded from a local file: pool3 features (2048) and the 1008
    unbiased logits used by IS. Images go in as uint8 (N, C, H, W), C in {1, 3}; torch-fidelity
    resizes them to 299x299 (TF1-compatible bilinear) itself."""

    name = FEATURE_EXTRACTOR_NAME

    def __init__(self, weights_path: str | Path, device: str | torch.device = "cpu"):
        path = check_inception_weights(weights_path)
        _validate_state_dict(path)
        FeatureExtractorInceptionV3 = torch_fidelity_inception_class()
        self.weights_path = path
        self.weights_sha256 = file_sha256(path)
        self.hash = f"inception-{self.weights_sha256[:16]}"
        self.device = torch.device(device)
        # A path is always given, so torch-fidelity loads it and never downloads.
        self.model = FeatureExtractorInceptionV3(
            FEATURE_EXTRACTOR_NAME, ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path)
        ).to(self.device)
        self.model.eval()

    @torch.no_grad()
    def features_and_logits(self, images: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (N, C, H, W), C in {1, 3} -> pool3 features (N, 2048) and unbiased logits (N, 1008), float32 CPU."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"Inception takes uint8 (N, 1 or 3, H, W) images, got {images.dtype} {tuple(images.shape)}"
            )
        feats, logits = [], []
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].to(self.device)
            if batch.shape[1] == 1:
                batch = batch.expand(-1, 3, -1, -1)  # grayscale -> RGB, as image viewers show it
            pool, unbiased = self.model(batch.contiguous())
            feats.append(pool.float().cpu())
            logits.append(unbiased.float().cpu())
        return torch.cat(feats), torch.cat(logits)

    def features(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """uint8 (N, C, H, W) -> (N, 2048) pool3 features."""
        return self.features_and_logits(images, batch_size)[0]


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
    """Inception Score (Salimans et al. 2016, sec. 4): exp(E_x KL(p(y|x) || p(y))).

    Computed on `splits` equal parts of the samples after a fixed shuffle, returning the mean and
    (population) std over parts: the protocol and defaults of torch-fidelity, so numbers agree.

    Args:
        logits: (N, K) unbiased Inception logits (K = 1008).
    """
    if logits.ndim != 2 or logits.shape[0] < splits:
        raise ValueError(f"need (N, K) logits with N >= splits={splits}, got {tuple(logits.shape)}")
    num = logits.shape[0]
    order = torch.as_tensor(np.random.RandomState(seed).permutation(num))
    logits = logits[order].to(torch.float64)
    log_p = logits.log_softmax(dim=1)  # log p(y|x)
    scores = []
    for i in range(splits):
        part = log_p[i * num // splits : (i + 1) * num // splits]
        log_marginal = part.exp().mean(dim=0).log()  # log p(y) over this part
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))
