"""ditkit's Inception FID/IS against torch-fidelity's own `calculate_metrics`, on the same images.

Needs torch-fidelity with a working torchvision (its `calculate_metrics` imports torchvision; a
GPU machine's stock PyTorch image has one). The pt_inception weights cannot be downloaded here,
so both sides load the same random weights file of the real shapes (tests/inception_helpers.py);
the comparison is of everything around the network: uint8 handling, batching, float64 statistics,
the matrix square root (ditkit's own vs scipy's), the Inception Score splits. (A random network's
logits barely vary between images, so its Inception Scores sit near 1: only their agreement counts.)

    python benchmarks/inception_agreement.py --device cuda --json inception_agreement.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from common import machine, write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from inception_helpers import write_random_inception_weights  # noqa: E402

from ditkit.eval.frechet import feature_stats, frechet_distance  # noqa: E402
from ditkit.eval.inception import InceptionExtractor, inception_score, torch_fidelity_version  # noqa: E402


class _Images(torch.utils.data.Dataset):
    """uint8 (N, 3, H, W) images as torch-fidelity wants them: one uint8 (3, H, W) per item."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def smooth_images(n: int, size: int, generator: torch.Generator, noise: float = 0.0) -> torch.Tensor:
    """uint8 (n, 3, size, size): low-resolution random colours upsampled, plus Gaussian noise."""
    base = torch.rand(n, 3, 4, 4, generator=generator)
    x = torch.nn.functional.interpolate(base, size=size, mode="bilinear", align_corners=False)
    x = x + noise * torch.randn(x.shape, generator=generator)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=500)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--weights", default="/tmp/random_inception.pth")
    parser.add_argument("--json", default="benchmarks/results/inception_agreement.json")
    args = parser.parse_args()
    import torch_fidelity  # the real package: needs torchvision

    weights = write_random_inception_weights(args.weights, seed=0)
    generator = torch.Generator().manual_seed(0)
    real = smooth_images(args.num, args.size, generator)
    rows = []
    for noise in (0.0, 0.05, 0.2):
        fake = smooth_images(args.num, args.size, generator, noise)
        t0 = time.perf_counter()
        theirs = torch_fidelity.calculate_metrics(
            input1=_Images(fake), input2=_Images(real), fid=True, isc=True, cuda=args.device.startswith("cuda"),
            feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(weights),
            batch_size=100, verbose=False, cache=False, save_cpu_ram=True,
        )
        t1 = time.perf_counter()
        extractor = InceptionExtractor(weights, device=args.device)
        fake_feats, fake_logits = extractor.features_and_logits(fake, batch_size=100)
        real_feats = extractor.features(real, batch_size=100)
        fid = frechet_distance(*feature_stats(fake_feats), *feature_stats(real_feats))
        is_mean, is_std = inception_score(fake_logits)
        t2 = time.perf_counter()
        row = {
            "noise": noise, "fid_torch_fidelity": theirs["frechet_inception_distance"], "fid_ditkit": fid,
            "is_torch_fidelity": theirs["inception_score_mean"], "is_ditkit": is_mean,
            "is_std_torch_fidelity": theirs["inception_score_std"], "is_std_ditkit": is_std,
            "seconds_torch_fidelity": t1 - t0, "seconds_ditkit": t2 - t1,
        }
        row["fid_rel_diff"] = abs(row["fid_ditkit"] - row["fid_torch_fidelity"]) / max(abs(row["fid_torch_fidelity"]), 1e-12)
        row["is_rel_diff"] = abs(row["is_ditkit"] - row["is_torch_fidelity"]) / row["is_torch_fidelity"]
        rows.append(row)
        print(row, flush=True)
    write_json(args.json, {"machine": machine(), "torch_fidelity": torch_fidelity_version(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
