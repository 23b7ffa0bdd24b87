"""Interop with what the DiT world already has, all offline from local paths:

* official facebookresearch/DiT checkpoints (``import_official_dit``),
* the diffusers format, both ways (``export_diffusers`` / ``import_diffusers``),
* a local diffusers AutoencoderKL as the latent space (``load_vae``),
* fine-tuning initialisation from any of these or a ditkit run (``init_from``).

Imported official models become standard ditkit runs (``imported_config`` + ``save_imported_run``);
the training loop's hooks for ``--vae`` and ``--init-from`` are in ``ditkit.interop.training`` and
the commands in ``ditkit.cli.interop``.
"""

from ditkit.interop.common import (
    InteropError,
    dit_kwargs,
    imported_config,
    infer_dit_kwargs,
    load_imported,
    save_imported,
    save_imported_run,
)
from ditkit.interop.diffusers_format import export_diffusers, import_diffusers, read_diffusers_folder
from ditkit.interop.finetune import init_from, read_source_state_dict
from ditkit.interop.official import OfficialCheckpoint, import_official_dit, read_official_checkpoint
from ditkit.interop.vae import LatentVAE, load_vae

__all__ = [
    "InteropError",
    "LatentVAE",
    "OfficialCheckpoint",
    "dit_kwargs",
    "export_diffusers",
    "import_diffusers",
    "import_official_dit",
    "imported_config",
    "infer_dit_kwargs",
    "init_from",
    "load_imported",
    "load_vae",
    "read_diffusers_folder",
    "read_official_checkpoint",
    "read_source_state_dict",
    "save_imported",
    "save_imported_run",
]
