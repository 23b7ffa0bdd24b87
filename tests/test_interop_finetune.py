"""Fine-tuning initialisation from an official checkpoint, a ditkit run/checkpoint dir or a
diffusers folder into a new model with another class count, image size or output layout."""

import warnings

import pytest
import torch
from safetensors.torch import save_file

from ditkit.interop import InteropError, export_diffusers, init_from, save_imported
from ditkit.models.dit import build_dit


def source_model(seed=0, **kw):
    """A DiT-T/2 on 8x8x4 latents, 10 classes, every weight random."""
    args = dict(input_size=8, in_channels=4, num_classes=10) | kw
    model = build_dit("DiT-T/2", **args).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def target(**kw):
    return build_dit("DiT-T/2", **(dict(input_size=8, in_channels=4, num_classes=10) | kw)).eval()


@pytest.fixture
def official_pt(tmp_path):
    src = source_model()
    torch.save(src.state_dict(), tmp_path / "official.pt")
    return src, tmp_path / "official.pt"


def forward(model, y, t=(5.0, 600.0)):
    """Outputs for two fixed noisy inputs; y None for an unconditional model."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(len(t), model.in_channels, model.input_size, model.input_size, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor(t), None if y is None else torch.tensor(y))


def test_new_class_count_keeps_mapped_rows_and_the_null_row(official_pt):
    src, path = official_pt
    new = target(num_classes=4)
    record = init_from(new, path, class_map={0: 7, 2: 3}, generator=torch.Generator().manual_seed(0))
    old_table, table = src.y_embedder.embedding_table.weight, new.y_embedder.embedding_table.weight
    assert table.shape == (5, 64)
    assert torch.equal(table[0], old_table[7]) and torch.equal(table[2], old_table[3])
    assert torch.equal(table[4], old_table[10])  # null row last
    for fresh in (1, 3):
        assert not any(torch.allclose(table[fresh], row) for row in old_table)
        assert 0.005 < table[fresh].std() < 0.05  # N(0, 0.02) like a fresh DiT
    assert (record["label_rows_copied"], record["label_rows_fresh"], record["kind"]) == (2, 2, "official")
    assert record["pos_embed"] == "copied"
    # Mapped classes and the null class behave exactly like the source's.
    torch.testing.assert_close(forward(new, [0, 4]), forward(src, [7, 10]), atol=0, rtol=0)


def test_without_a_class_map_new_counts_start_fresh_with_a_warning(official_pt):
    src, path = official_pt
    new = target(num_classes=12)
    with pytest.warns(UserWarning, match="class_map"):
        record = init_from(new, path)
    assert record["label_rows_fresh"] == 12
    assert torch.equal(new.y_embedder.embedding_table.weight[12], src.y_embedder.embedding_table.weight[10])


def test_other_image_size_recomputes_pos_embed(official_pt):
    src, path = official_pt
    new = target(input_size=16)
    record = init_from(new, path)
    assert record["pos_embed"].startswith("recomputed for a 8x8 grid")
    assert torch.equal(new.pos_embed, target(input_size=16).pos_embed)
    assert torch.equal(new.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    rope = target(pos_embed="rope")
    assert "RoPE" in init_from(rope, path)["pos_embed"] and not rope.pos_embed.any()


def test_unconditional_target_starts_as_the_sources_null_class(official_pt):
    src, path = official_pt
    new = target(num_classes=0)
    record = init_from(new, path)
    assert "folded" in record["notes"][0]
    torch.testing.assert_close(forward(new, None), forward(src, [10, 10]), atol=1e-6, rtol=1e-6)


def test_dropping_learned_sigma_keeps_the_mean_channels(official_pt):
    src, path = official_pt
    new = target(learn_sigma=False)
    init_from(new, path)
    torch.testing.assert_close(forward(new, [1, 2]), forward(src, [1, 2])[:, :4], atol=1e-6, rtol=1e-6)
    grown = target(learn_sigma=True)
    init_from(grown, path)  # same layout: a plain copy
    torch.testing.assert_close(forward(grown, [1, 2]), forward(src, [1, 2]), atol=0, rtol=0)


def test_ditkit_dirs_and_diffusers_folders_are_sources(tmp_path):
    src = source_model(timestep_freq_shift=1.0)
    save_imported(src, tmp_path / "imported", {"format": "test"})
    step = tmp_path / "run" / "checkpoints" / "step_0000200"
    step.mkdir(parents=True)
    ema = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(ema, str(step / "ema.safetensors"))
    older = tmp_path / "run" / "checkpoints" / "step_0000100"
    older.mkdir()
    save_file({k: torch.zeros_like(v) for k, v in ema.items()}, str(older / "ema.safetensors"))
    export_diffusers(src, tmp_path / "diffusers")

    for source, kind in [("imported", "ditkit"), ("run", "ditkit"), ("diffusers", "diffusers")]:
        new = target(timestep_freq_shift=1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            record = init_from(new, tmp_path / source)
        assert record["kind"] == kind
        for key, value in src.state_dict().items():
            assert torch.equal(new.state_dict()[key], value), (source, key)
    assert init_from(target(timestep_freq_shift=1.0), tmp_path / "run")["init_from"].endswith("step_0000200")

    with pytest.warns(UserWarning, match="timestep_freq_shift=1"):
        record = init_from(target(), tmp_path / "diffusers")  # an official-convention target
    assert any("timestep_freq_shift" in note for note in record["notes"])


def test_architecture_mismatch_names_the_keys(official_pt):
    _, path = official_pt
    with pytest.raises(InteropError, match="blocks.4.attn.qkv.weight") as err:
        init_from(build_dit("DiT-T/2", input_size=8, in_channels=4, num_classes=10, depth=5), path)
    assert "depth 4, hidden size 64" in str(err.value)
    with pytest.raises(InteropError, match="outside 0..9"):
        init_from(target(num_classes=3), path, class_map={0: 10})
