"""Exporting to diffusers says what is lost (issue 14, part 4): a run trained with
``model.timestep_freq_shift=1`` round-trips exactly; the official convention is refused unless
``--allow-lossy``; ``--init-from`` refuses a source of the other convention; guidance works in
diffusers for class counts other than 1000 (``pipeline_ditkit.py``)."""

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ditkit.builders import load_model  # noqa: E402
from ditkit.checkpoint_io import Checkpoint  # noqa: E402
from ditkit.cli import main  # noqa: E402
from ditkit.interop import InteropError, export_diffusers, import_diffusers  # noqa: E402
from ditkit.interop.common import source_timestep_freq_shift  # noqa: E402
from ditkit.interop.diffusers_format import LOSSY_SHIFT_MEASURED  # noqa: E402
from ditkit.models.dit import build_dit  # noqa: E402

TINY = ["train", "--recipe", "shapes_tiny", "--max-steps", "2", "--ckpt-every", "2", "--log-every", "2"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    diffusers.utils.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny trained runs: one with diffusers' timestep convention, one with ditkit's default."""
    root = tmp_path_factory.mktemp("runs")
    assert main([*TINY, "--results-dir", str(root), "--run-name", "shift1", "--set", "model.timestep_freq_shift=1"]) == 0
    assert main([*TINY, "--results-dir", str(root), "--run-name", "shift0"]) == 0
    return root


def test_a_run_trained_with_shift_1_round_trips_through_diffusers_to_1e_5(runs, tmp_path, capsys):
    assert main(["export-diffusers", str(runs / "shift1"), str(tmp_path / "t")]) == 0  # exact: no --allow-lossy needed
    out = capsys.readouterr().out
    assert "class_labels=y" in out and "label 4 as the null class" in out  # shapes: 4 classes, null row 4
    ours, _ = load_model(Checkpoint.open(runs / "shift1"))
    theirs = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "t").eval()
    back = import_diffusers(tmp_path / "t")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, ours.in_channels, ours.input_size, ours.input_size, generator=g)
    t = torch.tensor([0, 10, 250, 600, 999])
    y = torch.tensor([0, 1, 2, 3, 4])  # 4: the null class
    with torch.no_grad():
        reference = ours(x, t, y)
        assert (theirs(x, timestep=t, class_labels=y).sample - reference).abs().max() < 1e-5
        assert (back(x, t, y) - reference).abs().max() < 1e-5


def test_a_run_with_the_default_convention_is_refused_and_allow_lossy_quotes_the_measured_cost(runs, tmp_path, capsys):
    assert main(["export-diffusers", str(runs / "shift0"), str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert "--set model.timestep_freq_shift=1" in err and "--allow-lossy" in err and LOSSY_SHIFT_MEASURED in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "t").exists()
    assert main(["export-diffusers", str(runs / "shift0"), str(tmp_path / "t"), "--allow-lossy"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("ditkit export-diffusers: warning: ") and LOSSY_SHIFT_MEASURED in err and "FD" in err
    assert json.loads((tmp_path / "t" / "config.json").read_text())["_class_name"] == "DiTTransformer2DModel"


def test_the_measured_cost_is_filled_in():
    assert "FD" in LOSSY_SHIFT_MEASURED and "accuracy" in LOSSY_SHIFT_MEASURED and "PENDING" not in LOSSY_SHIFT_MEASURED


def test_init_from_a_source_of_the_other_convention_is_refused_unless_allowed(runs, tmp_path, capsys):
    export_diffusers(load_model(Checkpoint.open(runs / "shift1"))[0], tmp_path / "d")
    assert source_timestep_freq_shift(tmp_path / "d") == 1.0
    assert source_timestep_freq_shift(runs / "shift0") == 0.0
    assert source_timestep_freq_shift(next((runs / "shift1" / "checkpoints").iterdir())) == 1.0
    base = ["train", "--recipe", "shapes_tiny", "--init-from", str(tmp_path / "d"), "--print-config"]
    assert main(base) == 2
    assert "--set model.timestep_freq_shift=1" in capsys.readouterr().err
    assert main([*base, "--set", "model.timestep_freq_shift=1"]) == 0
    assert main([*base, "--allow-lossy"]) == 0
    assert main(["train", "--recipe", "shapes_tiny", "--init-from", str(runs / "shift0"), "--print-config"]) == 0


def tiny_vae(folder):
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=16,
    )
    vae.save_pretrained(folder)
    return folder


def test_guidance_works_in_diffusers_for_a_10_class_export(tmp_path):
    model = build_dit("DiT-T/2", input_size=8, in_channels=4, num_classes=10, timestep_freq_shift=1.0).eval()
    export_diffusers(model, tmp_path / "p", vae=tiny_vae(tmp_path / "vae"))
    folder = tmp_path / "p"
    call = dict(class_labels=[3, 7], guidance_scale=4.0, num_inference_steps=2, output_type="pt")

    plain = diffusers.DiTPipeline.from_pretrained(folder)
    plain.set_progress_bar_config(disable=True)
    with pytest.raises(IndexError):  # the reason for the custom pipeline: null label 1000 in an 11-row table
        plain(**call, generator=torch.Generator().manual_seed(0))

    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, custom_pipeline=str(folder / "pipeline_ditkit.py"),
                                                  trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "DiTkitPipeline"
    seen = []
    embedder = pipe.transformer.transformer_blocks[0].norm1.emb.class_embedder  # sees the labels after any remapping
    embedder.register_forward_pre_hook(lambda module, args: seen.append(args[0].tolist()))
    images = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(images).all() and seen and all(labels == [3, 7, 10, 10] for labels in seen)
    # guidance_scale 1: no null half, labels untouched
    seen.clear()
    pipe(**{**call, "guidance_scale": 1.0}, generator=torch.Generator().manual_seed(0))
    assert all(labels == [3, 7] for labels in seen)


def test_exports_with_1000_classes_need_no_custom_pipeline(tmp_path):
    model = build_dit("DiT-T/2", input_size=8, in_channels=4, num_classes=1000, timestep_freq_shift=1.0).eval()
    export_diffusers(model, tmp_path / "p", vae=tiny_vae(tmp_path / "vae"))
    assert not (tmp_path / "p" / "pipeline_ditkit.py").exists()


def test_the_library_refuses_too(tmp_path):
    with pytest.raises(InteropError, match="--allow-lossy"):
        export_diffusers(build_dit("DiT-T/2", input_size=8, in_channels=4, num_classes=10), tmp_path / "t")
