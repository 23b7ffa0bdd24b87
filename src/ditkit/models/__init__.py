"""Plain PyTorch networks: forward(x, t, y) -> tensor. Nothing here knows about noise."""

from ditkit.models.dit import DIT_PRESETS, DiT, build_dit, count_params, forward_macs, train_flops_per_image
from ditkit.models.text_dit import TEXT_DIT_PRESETS, TextDiT, build_text_dit, text_forward_macs

__all__ = [
    "DiT", "DIT_PRESETS", "build_dit", "count_params", "forward_macs", "train_flops_per_image",
    "TextDiT", "TEXT_DIT_PRESETS", "build_text_dit", "text_forward_macs",
]
