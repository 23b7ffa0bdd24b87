"""The diffusers format both ways, checked against diffusers itself (a dev dependency)."""

import json
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ditkit.interop import InteropError, export_diffusers, import_diffusers, read_diffusers_folder  # noqa: E402
from ditkit.models.dit import build_dit  # noqa: E402


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    diffusers.utils.logging.set_verbosity_error()


def random_dit(seed: int = 0, **kw):
    """A DiT-T/2 on 8x8x4 latents with every weight random (adaLN and final layer included)."""
    args = dict(input_size=8, in_channels=4, num_classes=10, timestep_freq_shift=1.0) | kw
    model = build_dit("DiT-T/2", **args).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(3, 4, 8, 8, generator=g), torch.tensor([0.0, 321.0, 999.0]), torch.tensor([0, 7, 10])


def run_diffusers(model, x, t, y):
    with torch.no_grad():
        return model(x, timestep=t, class_labels=y).sample


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_export_loads_in_diffusers_with_equal_outputs(tmp_path, learn_sigma):
    model = random_dit(learn_sigma=learn_sigma)
    export_diffusers(model, tmp_path / "transformer")
    config = json.loads((tmp_path / "transformer" / "config.json").read_text())
    assert config["norm_eps"] == 1e-6 and config["out_channels"] == (8 if learn_sigma else 4)
    theirs = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "transformer").eval()
    x, t, y = inputs()
    with torch.no_grad():
        ours = model(x, t, y)
    assert ours.abs().max() > 0.1
    assert (run_diffusers(theirs, x, t, y) - ours).abs().max() < 1e-5

    back = import_diffusers(tmp_path / "transformer")
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_diffusers_model_imports_with_equal_outputs(tmp_path):
    theirs = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=3,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6,
    ).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        # diffusers holds the embedders once per block; a faithful model has equal copies.
        first = theirs.transformer_blocks[0].norm1.emb
        for block in theirs.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first.state_dict())
    theirs.save_pretrained(tmp_path / "dm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # agreeing copies and eps 1e-6: no warning
        ours = import_diffusers(tmp_path / "dm")
    assert (ours.num_heads, len(ours.blocks), ours.learn_sigma) == (2, 3, True)
    x, t, y = inputs()
    with torch.no_grad():
        assert (ours(x, t, y) - run_diffusers(theirs, x, t, y)).abs().max() < 1e-5


def test_disagreeing_block_embedders_warn_and_block_0_wins(tmp_path):
    model = random_dit()
    export_diffusers(model, tmp_path / "t")
    theirs = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "t")
    with torch.no_grad():
        theirs.transformer_blocks[2].norm1.emb.timestep_embedder.linear_1.weight.add_(0.5)
    theirs.save_pretrained(tmp_path / "drifted")
    with pytest.warns(UserWarning, match="differ from block 0"):
        ours = import_diffusers(tmp_path / "drifted")
    assert torch.equal(ours.t_embedder.mlp[0].weight, model.t_embedder.mlp[0].weight)


def test_other_norm_eps_warns(tmp_path):
    export_diffusers(random_dit(), tmp_path / "t")
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    del config["norm_eps"]  # an older config: diffusers' default 1e-5
    (tmp_path / "t" / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="norm_eps=1e-05"):
        import_diffusers(tmp_path / "t")


def test_official_timestep_convention_is_refused_unless_lossy_is_allowed_and_the_difference_is_real(tmp_path):
    model = random_dit(timestep_freq_shift=0.0)
    with pytest.raises(InteropError, match="timestep_freq_shift=1.*--allow-lossy"):
        export_diffusers(model, tmp_path / "t")
    with pytest.warns(UserWarning, match="timestep_freq_shift=0"):
        export_diffusers(model, tmp_path / "t", allow_lossy=True)
    theirs = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "t").eval()
    x, t, y = inputs()
    with torch.no_grad():
        ours = model(x, t, y)
    relative = (run_diffusers(theirs, x, t, y) - ours).norm() / ours.norm()
    assert relative > 1e-3  # far above float noise: the docstring's warning is real
    exact = import_diffusers(tmp_path / "t", timestep_freq_shift=0.0)
    with torch.no_grad():
        torch.testing.assert_close(exact(x, t, y), ours, atol=0, rtol=0)


@pytest.mark.parametrize(
    "kw, words",
    [(dict(pos_embed="rope"), "rope"), (dict(mlp="swiglu"), "swiglu"), (dict(num_classes=0), "num_classes=0")],
)
def test_models_diffusers_cannot_express_are_refused(tmp_path, kw, words):
    with pytest.raises(InteropError, match=words):
        export_diffusers(random_dit(**kw), tmp_path / "t")


def tiny_vae(folder):
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=16,
    )
    vae.save_pretrained(folder)
    return folder


def test_pipeline_folder_runs_in_diffusers_and_imports_back(tmp_path):
    model = random_dit()
    names = [f"class {i}" for i in range(10)]
    export_diffusers(model, tmp_path / "pipe", vae=tiny_vae(tmp_path / "vae"), id2label=names)
    assert (tmp_path / "pipe" / "pipeline_ditkit.py").is_file()  # 10 classes: DiTPipeline's null 1000 does not fit
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["id2label"]["7"] == "class 7" and index["transformer"] == ["diffusers", "DiTTransformer2DModel"]

    pipe = diffusers.DiTPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.get_label_ids(["class 3"]) == [3]
    images = pipe(class_labels=[3], guidance_scale=1.0, num_inference_steps=2, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()

    state, config, info = read_diffusers_folder(tmp_path / "pipe")
    assert info["id2label"][3] == "class 3" and info["scheduler"]["beta_schedule"] == "linear"
    back = import_diffusers(tmp_path / "pipe")
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(back(x, t, y), model(x, t, y), atol=0, rtol=0)
