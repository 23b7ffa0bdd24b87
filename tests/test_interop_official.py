"""Official DiT checkpoints: strict import of raw and training-style files, clear errors, and an
independent reference forward written here from the published maths (not from any DiT code)."""

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F

from ditkit.interop import (
    InteropError,
    dit_kwargs,
    import_official_dit,
    load_imported,
    read_official_checkpoint,
    save_imported,
)
from ditkit.models.dit import DiT, build_dit

# A tiny "official-style" model: the DiT-T/2 dimensions on a 64 px image (8x8 latent, 4 channels).
HIDDEN, DEPTH, HEADS, PATCH, CHANNELS, LATENT, CLASSES = 64, 4, 4, 2, 4, 8, 10


def mae_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """MAE 2-D sin-cos table in float64: token r * grid + c gets [E(c), E(r)], E(p) = [sin(p w), cos(p w)],
    w_i = 10000 ** (-i / (dim / 4)) for i < dim / 4."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def embed(pos: torch.Tensor) -> torch.Tensor:
        arg = pos.to(torch.float64)[:, None] * omega[None]
        return torch.cat([arg.sin(), arg.cos()], dim=1)

    r = torch.arange(grid).repeat_interleave(grid)
    c = torch.arange(grid).repeat(grid)
    return torch.cat([embed(c), embed(r)], dim=1)


def official_state_dict(seed: int = 0, learn_sigma: bool = True, num_classes: int = CLASSES, latent: int = LATENT):
    """Official key names and shapes with random values (adaLN not zero, so every path matters)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.1):
        return torch.randn(*shape, generator=g) * std

    out_ch = 2 * CHANNELS if learn_sigma else CHANNELS
    sd = {
        "pos_embed": mae_pos_embed(HIDDEN, latent // PATCH).float()[None],
        "x_embedder.proj.weight": rnd(HIDDEN, CHANNELS, PATCH, PATCH, std=0.3),
        "x_embedder.proj.bias": rnd(HIDDEN),
        "t_embedder.mlp.0.weight": rnd(HIDDEN, 256),
        "t_embedder.mlp.0.bias": rnd(HIDDEN),
        "t_embedder.mlp.2.weight": rnd(HIDDEN, HIDDEN),
        "t_embedder.mlp.2.bias": rnd(HIDDEN),
        "y_embedder.embedding_table.weight": rnd(num_classes + 1, HIDDEN, std=0.5),
    }
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd |= {
            b + "attn.qkv.weight": rnd(3 * HIDDEN, HIDDEN),
            b + "attn.qkv.bias": rnd(3 * HIDDEN),
            b + "attn.proj.weight": rnd(HIDDEN, HIDDEN),
            b + "attn.proj.bias": rnd(HIDDEN),
            b + "mlp.fc1.weight": rnd(4 * HIDDEN, HIDDEN),
            b + "mlp.fc1.bias": rnd(4 * HIDDEN),
            b + "mlp.fc2.weight": rnd(HIDDEN, 4 * HIDDEN),
            b + "mlp.fc2.bias": rnd(HIDDEN),
            b + "adaLN_modulation.1.weight": rnd(6 * HIDDEN, HIDDEN),
            b + "adaLN_modulation.1.bias": rnd(6 * HIDDEN),
        }
    sd |= {
        "final_layer.linear.weight": rnd(PATCH * PATCH * out_ch, HIDDEN),
        "final_layer.linear.bias": rnd(PATCH * PATCH * out_ch),
        "final_layer.adaLN_modulation.1.weight": rnd(2 * HIDDEN, HIDDEN),
        "final_layer.adaLN_modulation.1.bias": rnd(2 * HIDDEN),
    }
    return sd


def reference_forward(sd, x, t, y):
    """DiT forward from the facts: conv patchify + pos_embed; [cos, sin] timestep sinusoid of 256
    frequencies, max period 10000; c = MLP(t) + label row; adaLN chunks (shift_msa, scale_msa,
    gate_msa, shift_mlp, scale_mlp, gate_mlp); LayerNorm eps 1e-6 without affine; GELU-tanh MLP;
    final (shift, scale); tokens unpatchified with per-token layout (p, p, C)."""
    B, C, H, W = x.shape
    p, h, w = PATCH, H // PATCH, W // PATCH
    weight = sd["x_embedder.proj.weight"].reshape(HIDDEN, C * p * p)
    patches = x.reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * p * p)
    tokens = patches @ weight.T + sd["x_embedder.proj.bias"] + sd["pos_embed"]

    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    t_freq = torch.cat([args.cos(), args.sin()], dim=1)
    t_emb = F.linear(F.silu(F.linear(t_freq, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                     sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = t_emb + sd["y_embedder.embedding_table.weight"][y]

    def ln(v):
        mu = v.mean(-1, keepdim=True)
        var = ((v - mu) ** 2).mean(-1, keepdim=True)
        return (v - mu) / torch.sqrt(var + 1e-6)

    hd = HIDDEN // HEADS
    for i in range(DEPTH):
        pre = f"blocks.{i}."
        mod = F.linear(F.silu(c), sd[pre + "adaLN_modulation.1.weight"], sd[pre + "adaLN_modulation.1.bias"])
        s1, sc1, g1, s2, sc2, g2 = [m[:, None] for m in mod.split(HIDDEN, dim=1)]
        a = ln(tokens) * (1 + sc1) + s1
        qkv = F.linear(a, sd[pre + "attn.qkv.weight"], sd[pre + "attn.qkv.bias"])
        q, k, v = [m.reshape(B, -1, HEADS, hd).transpose(1, 2) for m in qkv.split(HIDDEN, dim=-1)]
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
        att = att.transpose(1, 2).reshape(B, -1, HIDDEN)
        tokens = tokens + g1 * F.linear(att, sd[pre + "attn.proj.weight"], sd[pre + "attn.proj.bias"])
        m = ln(tokens) * (1 + sc2) + s2
        m = F.gelu(F.linear(m, sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"]), approximate="tanh")
        tokens = tokens + g2 * F.linear(m, sd[pre + "mlp.fc2.weight"], sd[pre + "mlp.fc2.bias"])
    shift, scale = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"],
                            sd["final_layer.adaLN_modulation.1.bias"]).split(HIDDEN, dim=1)
    out = F.linear(ln(tokens) * (1 + scale[:, None]) + shift[:, None], sd["final_layer.linear.weight"],
                   sd["final_layer.linear.bias"])
    oc = out.shape[-1] // (p * p)
    out = out.reshape(B, h, w, p, p, oc).permute(0, 5, 1, 3, 2, 4)
    return out.reshape(B, oc, H, W)


def inputs(batch: int = 3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, CHANNELS, LATENT, LATENT, generator=g)
    return x, torch.tensor([0.0, 417.0, 999.0][:batch]), torch.tensor([3, 9, CLASSES][:batch])


def test_raw_checkpoint_imports_strictly_and_matches_the_official_maths(tmp_path):
    sd = official_state_dict()
    torch.save(sd, tmp_path / "DiT-T-2-64x64.pt")
    model = import_official_dit(tmp_path / "DiT-T-2-64x64.pt", model="DiT-T/2", image_size=64, num_classes=CLASSES)
    assert not model.training
    x, t, y = inputs()
    with torch.no_grad():
        out = model(x, t, y)
    ref = reference_forward(sd, x, t, y)
    assert out.shape == (3, 2 * CHANNELS, LATENT, LATENT)
    assert ref.abs().max() > 0.5  # a non-trivial output
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # ditkit's own table (used at other sizes) is the MAE table of the facts.
    fresh = build_dit("DiT-T/2", input_size=LATENT, in_channels=CHANNELS, num_classes=CLASSES)
    torch.testing.assert_close(fresh.pos_embed[0].double(), mae_pos_embed(HIDDEN, LATENT // PATCH), atol=1e-7, rtol=0)


def test_training_checkpoint_uses_ema_and_allows_namespace_args(tmp_path):
    model_sd, ema_sd = official_state_dict(seed=1), official_state_dict(seed=2)
    net = build_dit("DiT-T/2", input_size=LATENT, in_channels=CHANNELS, num_classes=CLASSES)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    net(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), torch.tensor([0, 1])).square().mean().backward()
    opt.step()
    args = argparse.Namespace(model="DiT-T/2", image_size=64, num_classes=CLASSES, epochs=1400, global_seed=0)
    ckpt = {
        "model": {f"module.{k}": v for k, v in model_sd.items()},  # a DDP-wrapped save
        "ema": ema_sd,
        "opt": opt.state_dict(),
        "args": args,
    }
    torch.save(ckpt, tmp_path / "0050000.pt")

    read = read_official_checkpoint(tmp_path / "0050000.pt")
    assert (read.kind, read.weights) == ("training", "ema")
    assert read.args["model"] == "DiT-T/2" and read.meta()["args"]["epochs"] == 1400
    model = import_official_dit(tmp_path / "0050000.pt", model="DiT-T/2", image_size=64, num_classes=CLASSES)
    for key, value in ema_sd.items():
        assert torch.equal(model.state_dict()[key], value), key
    raw = import_official_dit(tmp_path / "0050000.pt", model=None, image_size=None, num_classes=None, use_ema=False)
    assert torch.equal(raw.blocks[2].attn.qkv.weight, model_sd["blocks.2.attn.qkv.weight"])


def test_everything_can_be_inferred_from_the_shapes(tmp_path):
    torch.save(official_state_dict(learn_sigma=False, num_classes=7, latent=16), tmp_path / "a.pt")
    model = import_official_dit(tmp_path / "a.pt", model=None, image_size=None, num_classes=None, learn_sigma=None)
    assert (model.input_size, model.num_classes, model.learn_sigma, len(model.blocks)) == (16, 7, False, DEPTH)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(model="DiT-S/2"), "x_embedder.proj.weight"),
        (dict(model="DiT-T/4"), "x_embedder.proj.weight"),
        (dict(image_size=32), "pos_embed"),
        (dict(num_classes=1000), "y_embedder.embedding_table.weight"),
        (dict(learn_sigma=False), "final_layer.linear.weight"),
    ],
)
def test_wrong_flags_name_the_keys_and_the_flags_that_fit(tmp_path, kwargs, key):
    torch.save(official_state_dict(), tmp_path / "ckpt.pt")
    args = dict(model="DiT-T/2", image_size=64, num_classes=CLASSES, learn_sigma=True) | kwargs
    with pytest.raises(InteropError) as err:
        import_official_dit(tmp_path / "ckpt.pt", **args)
    message = str(err.value)
    assert key in message
    assert "--model DiT-T/2 --image-size 64 --num-classes 10 --learn-sigma true" in message


class NotAllowed:
    """A class a checkpoint must not be able to make ditkit unpickle."""


def test_refuses_to_unpickle_anything_but_namespace(tmp_path):
    torch.save({"model": official_state_dict(), "args": NotAllowed()}, tmp_path / "evil.pt")
    with pytest.raises(InteropError, match="refuses to unpickle"):
        read_official_checkpoint(tmp_path / "evil.pt")


def test_save_imported_round_trip(tmp_path):
    torch.save(official_state_dict(), tmp_path / "ckpt.pt")
    model = import_official_dit(tmp_path / "ckpt.pt", model="DiT-T/2", image_size=64, num_classes=CLASSES)
    out = save_imported(model, tmp_path / "run", {"format": "official-dit", "path": "ckpt.pt"})
    record = json.loads((out / "model_config.json").read_text())
    assert record["preset"] == "DiT-T/2" and record["dit_kwargs"]["num_classes"] == CLASSES
    assert (out / "model.safetensors").is_file() and (out / "ema.safetensors").is_file()
    again = load_imported(out)
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(again(x, t, y), model(x, t, y), atol=0, rtol=0)


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(mlp="swiglu", qk_norm=True, norm="rmsnorm"),
        dict(pos_embed="rope", timestep_freq_shift=1.0, learn_sigma=False, num_classes=0, mlp_ratio=3.0),
    ],
)
def test_dit_kwargs_rebuilds_the_architecture(options):
    args = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=48, depth=2, num_heads=4, num_classes=5) | options
    model = DiT(**args)
    kwargs = dit_kwargs(model)
    for key, value in args.items():
        assert kwargs[key] == value, key
    rebuilt = DiT(**kwargs)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_import_dit_command_writes_a_checkpoint_dir(tmp_path, capsys):
    from ditkit.cli.interop import register as register_cli

    torch.save({"ema": official_state_dict(), "args": argparse.Namespace(model="DiT-T/2")}, tmp_path / "c.pt")
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["import-dit", str(tmp_path / "c.pt"), "--model", "DiT-T/2", "--out", str(tmp_path / "out")])
    assert args.func(args) == 0
    record = json.loads((tmp_path / "out" / "model_config.json").read_text())
    assert record["source"]["weights"] == "ema" and record["source"]["image_size"] == 64
    assert '"kind": "training"' in capsys.readouterr().out
