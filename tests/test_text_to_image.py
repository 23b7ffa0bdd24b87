"""Text-to-image end to end on tiny configs: the shapes_captions recipe trains with caption dropout
and resumes bitwise exactly, a checkpoint alone rebuilds the model and its tokenizer, the pipeline
draws from prompts (negative prompts, several images per prompt, seeds, attention maps), and
``ditkit sample --prompt`` writes grids and PNG metadata; bad input is one-line errors."""

import json
import shutil
import warnings

import pytest
import torch
from PIL import Image

import ditkit
from ditkit.cli import main
from ditkit.config import ConfigError
from ditkit.data.captions import ByteCaptionTokenizer, CaptionTokenizer, caption_tokenizer
from ditkit.models.prompt_dit import PROMPT_DIT_PRESETS, PromptDiT
from ditkit.pipelines.prompt import PromptPipeline
from ditkit.recipes import get_recipe
from ditkit.train import loop


def _tiny(tmp_path, name, **train):
    cfg = get_recipe("shapes_captions")
    cfg.run.results_dir, cfg.run.run_name, cfg.run.tensorboard = str(tmp_path), name, False
    cfg.data.num_items, cfg.data.image_size, cfg.data.caption_dropout = 24, 32, 0.5
    cfg.train.global_batch_size, cfg.train.max_steps, cfg.train.time_budget = 8, 5, None
    cfg.train.warmup_steps, cfg.train.log_every, cfg.train.ckpt_every, cfg.train.precision = 2, 1, 100, "fp32"
    cfg.sample.num_sampling_steps = 2
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("t2i")
    return loop.train(_tiny(tmp, "run"), log=lambda m: None).run_dir


def _weights(run):
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    from safetensors.torch import load_file

    return load_file(ckpt / "model.safetensors"), load_file(ckpt / "ema.safetensors")


def test_recipe_trains_and_resume_is_bitwise_exact(tmp_path, run_dir):
    stopped = loop.train(_tiny(tmp_path, "resumed"), stop_at_step=2, log=lambda m: None)
    assert stopped.step == 2
    loop.train(_tiny(tmp_path, "resumed"), resume=stopped.run_dir, log=lambda m: None)
    (ref, ref_ema), (got, got_ema) = _weights(run_dir), _weights(stopped.run_dir)
    assert set(ref) == set(got) and any(k.startswith("text_encoder.") for k in ref)
    for key in ref:
        assert torch.equal(ref[key], got[key]) and torch.equal(ref_ema[key], got_ema[key]), key
    # control: a different seed (other data order, noise and caption dropout) gives other weights
    other = loop.train(_tiny(tmp_path, "other", seed=1), log=lambda m: None)
    assert any(not torch.equal(ref[k], _weights(other.run_dir)[0][k]) for k in ref)


def test_caption_dropout_replaces_captions_by_the_empty_prompt_in_training_only():
    torch.manual_seed(0)
    model = PromptDiT(input_size=16, in_channels=3, vocab_size=40, caption_dropout=1.0, **PROMPT_DIT_PRESETS["T2I-CrossDiT-T/4"])
    with torch.no_grad():  # the zero-initialised cross-attention output would hide the caption
        for block in model.dit.blocks:
            torch.nn.init.normal_(block.cross_attn.proj.weight, std=0.2)
        torch.nn.init.normal_(model.dit.final_layer.linear.weight, std=0.2)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10.0, 500.0])
    ids = torch.tensor([[2, 5, 6, 7], [2, 9, 0, 0]])
    null = model.null_ids(2, 4)
    model.eval()
    cond, uncond = model(x, t, ids), model(x, t, null)
    assert not torch.allclose(cond, uncond)
    model.train()
    assert torch.allclose(model(x, t, ids), uncond, atol=1e-6)  # every caption dropped
    model.caption_dropout = 0.0
    assert torch.allclose(model(x, t, ids), cond, atol=1e-6)
    with pytest.raises(ConfigError, match="caption_dropout"):
        PromptDiT(caption_dropout=1.5, **PROMPT_DIT_PRESETS["T2I-CrossDiT-T/4"])


def test_checkpoint_alone_rebuilds_the_text_to_image_pipeline(tmp_path, run_dir):
    ckpt = sorted((run_dir / "checkpoints").iterdir())[-1]
    alone = tmp_path / "alone"
    shutil.copytree(ckpt, alone)
    pipe = ditkit.load(alone, device="cpu")
    assert isinstance(pipe, PromptPipeline) and pipe.max_prompt_tokens == 31
    assert pipe.tokenizer.vocab_size == 38 <= pipe.model.text_encoder.vocab_size == 259  # the grammar's words
    # a folder run from before fitted vocabularies (no caption_vocab_size recorded) trained on bytes
    assert isinstance(caption_tokenizer(type("D", (), {"dataset": "my/folder", "max_caption_length": 8})()), ByteCaptionTokenizer)


def test_pipeline_prompts_negative_prompts_seeds_and_attention_maps(run_dir):
    pipe = ditkit.load(run_dir, device="cpu")
    out = pipe(["a small red circle", "a large blue square above a green cross"], num_inference_steps=2,
               guidance_scale=3.0, num_images_per_prompt=2, seed=5, attention_maps=True)
    assert out.tensors.shape == (4, 3, 32, 32) and len(out.images) == 4
    assert out.prompts == ["a small red circle"] * 2 + ["a large blue square above a green cross"] * 2
    assert [w for w, _ in out.attention_maps[0]] == ["a", "small", "red", "circle"]
    heat = out.attention_maps[2][2][1]
    assert heat.shape == (32, 32) and float(heat.min()) == 0.0 and float(heat.max()) == pytest.approx(1.0)
    # image i depends only on its prompt and seed, not on the batch it was drawn in
    alone = pipe("a large blue square above a green cross", num_inference_steps=2, guidance_scale=3.0, seed=7)
    assert torch.allclose(alone.tensors[0], out.tensors[2], atol=1e-5)
    one_gen = pipe("a small red circle", num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(3))
    again = pipe("a small red circle", num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(one_gen.tensors, again.tensors)
    negative = pipe("a small red circle", num_inference_steps=2, guidance_scale=3.0, seed=5, negative_prompt="a white square")
    assert not torch.allclose(negative.tensors[0], out.tensors[0])
    assert negative.sample_metadata(0)["negative_prompt"] == "a white square"


def test_bad_prompts_are_one_line_errors_or_warnings(run_dir):
    pipe = ditkit.load(run_dir, device="cpu")
    with pytest.raises(ConfigError, match="empty prompt"):
        pipe("   ", num_inference_steps=1)
    long = " ".join(["red"] * 40)
    with pytest.raises(ConfigError, match="limit of 31 words"):
        pipe(long, num_inference_steps=1, strict=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe(long, num_inference_steps=1)
    assert any("limit of 31 words" in str(w.message) for w in caught)
    with pytest.raises(ConfigError, match="num-images-per-prompt"):
        pipe("a red circle", num_images_per_prompt=0)


def test_cli_sample_writes_captioned_grid_metadata_and_attention_strips(tmp_path, run_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a small red circle\n\na large green triangle\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["sample", "--ckpt", str(run_dir), "--prompt", "a white cross", "--prompt-file", str(prompts),
                 "--negative-prompt", "a blue square", "--num-images-per-prompt", "2", "--guidance-scale", "2",
                 "--num-inference-steps", "2", "--attention-maps", "--out-dir", str(out)]) == 0
    pngs = sorted(p.name for p in out.glob("0*.png"))
    assert len(pngs) == 6 and (out / "grid.png").is_file() and (out / "attention_02.png").is_file()
    with Image.open(out / "000004.png") as im:
        assert im.text["prompt"] == "a large green triangle" and im.text["negative_prompt"] == "a blue square"
    with Image.open(out / "grid.png") as grid, Image.open(out / "000000.png") as one:
        assert grid.height > 3 * one.height * 2  # three rows of enlarged images plus a caption band each
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"a red \xff circle\n")
    assert main(["sample", "--ckpt", str(run_dir), "--prompt-file", str(bad), "--out-dir", str(tmp_path / "o2")]) == 2
    assert main(["sample", "--ckpt", str(run_dir), "--out-dir", str(tmp_path / "o3")]) == 2  # no prompt


def test_ditkit_eval_writes_the_judges_metrics_as_json(tmp_path, run_dir, monkeypatch):
    import json

    from ditkit.eval import attributes

    torch.manual_seed(0)
    untrained = attributes.AttributeJudge().eval()  # the mechanics only: training a judge takes minutes
    monkeypatch.setattr(attributes, "load_or_train_judge", lambda *a, **k: untrained)
    out = tmp_path / "eval.json"
    assert main(["eval", "--ckpt", str(run_dir), "--num-samples", "10", "--num-sampling-steps", "1",
                 "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    for split in ("in_distribution", "held_out"):
        assert results[split]["num_prompts"] == 10 and 0 <= results[split]["success"] <= 1
        assert set(results[split]["accuracy"]) == {"count", "shape", "colour", "size", "relation"}
    assert results["FD (judge features)"] >= 0 and "FD (judge features) real-vs-real floor" in results
    assert main(["eval", "--ckpt", str(run_dir), "--num-samples", "3"]) == 2


def test_serve_images_takes_prompts_and_names_the_limit(run_dir):
    import asyncio
    import base64
    import io

    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from ditkit.serve.app import create_app
    from ditkit.serve.launch import load_models
    from ditkit.serve.limits import ServeLimits

    app = create_app(load_models([f"t2i={run_dir}"], device="cpu"), ServeLimits(max_queue=4, request_timeout_s=60))

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            info = (await client.get("/v1/models")).json()["models"][0]
            ok = await client.post("/v1/images", json={"model": "t2i", "prompt": "a small red circle", "num_images": 2,
                                                       "negative_prompt": "a blue square", "steps": 2, "seed": 1})
            empty = await client.post("/v1/images", json={"model": "t2i", "prompt": "  ", "steps": 2})
            long = await client.post("/v1/images", json={"model": "t2i", "prompt": "red " * 40, "steps": 2})
            labels = await client.post("/v1/images", json={"model": "t2i", "prompt": "a red circle", "class_labels": [1]})
            return info, ok, empty, long, labels

    try:
        info, ok, empty, long, labels = asyncio.run(go())
    finally:
        app.state.ditkit.close()
    assert info["prompts"] is True and info["max_prompt_tokens"] == 31
    assert ok.status_code == 200, ok.text
    images = ok.json()["images"]
    assert len(images) == 2 and images[1]["metadata"]["prompt"] == "a small red circle"
    with Image.open(io.BytesIO(base64.b64decode(images[0]["png_base64"]))) as im:
        assert im.text["negative_prompt"] == "a blue square"
    assert empty.status_code == 422 and "non-empty prompt" in empty.text
    assert long.status_code == 422 and "limit of 31 tokens" in long.text
    assert labels.status_code == 422 and "not class_labels" in labels.text


def test_cli_train_recipe_with_a_step_limit(tmp_path):
    assert main(["train", "--recipe", "shapes_captions", "--set", "train.max_steps=3", "--set", "data.num_items=16",
                 "--set", "train.global_batch_size=8", "--set", "train.log_every=1", "--set", "train.sample_every=3",
                 "--set", "sample.num_samples=4", "--set", "sample.num_sampling_steps=2",
                 "--results-dir", str(tmp_path), "--run-name", "cli"]) == 0
    ckpt = tmp_path / "cli" / "checkpoints" / "step_0000003"
    assert (ckpt / "config.json").is_file() and (ckpt / "ema.safetensors").is_file()
    with Image.open(tmp_path / "cli" / "samples" / "step_0000003.png") as grid:  # prompts under the rows
        assert grid.height > 4 * 64
    assert main(["train", "--recipe", "shapes_captions", "--set", "data.caption_dropout=2",
                 "--results-dir", str(tmp_path), "--run-name", "bad"]) == 2


def _caption_folder(tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    for i, (colour, caption) in enumerate([((220, 30, 30), "a red card"), ((30, 30, 220), "ein blaues Bild ü")] * 4):
        Image.new("RGB", (40, 40), colour).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption + "\n", encoding="utf-8")
    return folder


def _folder_cfg(tmp_path, folder, name, **data):
    cfg = get_recipe("shapes_captions")
    cfg.data.dataset, cfg.data.captioned, cfg.data.image_size = str(folder), True, 16
    for key, value in data.items():
        setattr(cfg.data, key, value)
    cfg.run.results_dir, cfg.run.run_name, cfg.run.tensorboard = str(tmp_path), name, False
    cfg.train.global_batch_size, cfg.train.max_steps, cfg.train.time_budget = 4, 2, None
    return cfg


def test_captioned_folder_trains_with_a_fitted_word_vocabulary_and_samples(tmp_path):
    folder = _caption_folder(tmp_path)
    (folder / "7.txt").write_bytes(b"\xff\xfe broken")  # not UTF-8: counted, then refused as uncaptioned
    cfg = _folder_cfg(tmp_path, folder, "folder")
    with pytest.raises(ConfigError, match="allow-uncaptioned"):
        loop.train(cfg, log=lambda m: None)
    cfg.data.allow_uncaptioned = True
    with pytest.warns(UserWarning, match="1 not utf8"):
        run = loop.train(cfg, log=lambda m: None).run_dir
    pipe = ditkit.load(run, device="cpu")
    # [PAD] [UNK] [BOS] + the seven words of the captions, lower-cased; the encoder has exactly those rows
    words = {"a", "red", "card", "ein", "blaues", "bild", "ü"}
    assert isinstance(pipe.tokenizer, CaptionTokenizer) and set(pipe.tokenizer.hf.get_vocab()) - {"[PAD]", "[UNK]", "[BOS]"} == words
    assert pipe.cfg.data.caption_vocab_size == 10 == pipe.model.text_encoder.vocab_size and pipe.max_prompt_tokens == 31
    assert json.loads((run / "text_tokenizer.json").read_text(encoding="utf-8"))["kind"] == "caption_word"
    out = pipe("ein blaues Bild ü", num_inference_steps=2, attention_maps=True)
    assert out.tensors.shape == (1, 3, 16, 16) and [w for w, _ in out.attention_maps[0]] == ["ein", "blaues", "Bild", "ü"]
    with pytest.warns(UserWarning, match=r"never saw in training, read as \[UNK\]: Green, car \(its vocabulary: 7 words\)"):
        out = pipe("a Green car", num_inference_steps=1, attention_maps=True)
    assert [w for w, _ in out.attention_maps[0]] == ["a", "Green", "car"]  # unknown words under their own names
    alone = tmp_path / "alone"  # a checkpoint folder without its tokenizer cannot guess a fitted vocabulary
    shutil.copytree(sorted((run / "checkpoints").iterdir())[-1], alone)
    (alone / "text_tokenizer.json").unlink()
    with pytest.raises(ConfigError, match="text_tokenizer.json"):
        ditkit.load(alone, device="cpu")


def test_captioned_folder_trains_with_the_byte_tokenizer_when_asked(tmp_path):
    cfg = _folder_cfg(tmp_path, _caption_folder(tmp_path), "bytes", caption_tokenizer="bytes")
    run = loop.train(cfg, log=lambda m: None).run_dir
    pipe = ditkit.load(run, device="cpu")
    assert isinstance(pipe.tokenizer, ByteCaptionTokenizer) and pipe.max_prompt_tokens == 31
    assert pipe.cfg.data.caption_vocab_size is None and pipe.model.text_encoder.vocab_size == 259
    out = pipe("ein blaues Bild ü", num_inference_steps=2, attention_maps=True)
    assert [w for w, _ in out.attention_maps[0]] == ["ein", "blaues", "Bild", "ü"]
    cfg = _folder_cfg(tmp_path, tmp_path / "pics", "bpe", caption_tokenizer="bpe")
    with pytest.raises(ConfigError, match="data.caption_tokenizer='bpe': use auto, words, bytes"):
        loop.train(cfg, log=lambda m: None)


def test_a_resumed_folder_run_keeps_its_fitted_vocabulary(tmp_path, monkeypatch):
    folder = _caption_folder(tmp_path)
    whole = loop.train(_folder_cfg(tmp_path, folder, "whole"), log=lambda m: None)
    halves = loop.train(_folder_cfg(tmp_path, folder, "halves"), stop_at_step=1, log=lambda m: None)

    def refit(*args, **kwargs):
        raise AssertionError("a resumed run must read its text_tokenizer.json, not fit a new vocabulary")

    monkeypatch.setattr(CaptionTokenizer, "fit", refit)
    resumed = loop.train(_folder_cfg(tmp_path, folder, "halves"), resume=halves.run_dir, log=lambda m: None)
    assert halves.step == 1 and resumed.step == 2
    (ref, ref_ema), (got, got_ema) = _weights(whole.run_dir), _weights(halves.run_dir)
    for key in ref:  # bitwise the uninterrupted run
        assert torch.equal(ref[key], got[key]) and torch.equal(ref_ema[key], got_ema[key]), key


def _drop_tokenizer_files(run):
    for path in run.rglob("text_tokenizer.json"):
        path.unlink()


def test_a_resumed_run_without_its_tokenizer_file_never_fits_a_new_one(tmp_path):
    folder = _caption_folder(tmp_path)
    # an older folder run (trained on bytes, before the caption_tokenizer field): its config rebuilds bytes
    old = loop.train(_folder_cfg(tmp_path, folder, "old", caption_tokenizer="bytes"), stop_at_step=1, log=lambda m: None)
    _drop_tokenizer_files(old.run_dir)
    for config in old.run_dir.rglob("config.json"):
        saved = json.loads(config.read_text())
        del saved["data"]["caption_tokenizer"], saved["data"]["caption_vocab_size"]
        config.write_text(json.dumps(saved))
    resumed = loop.train(_folder_cfg(tmp_path, folder, "old"), resume=old.run_dir, log=lambda m: None)
    assert resumed.step == 2 and isinstance(ditkit.load(old.run_dir, device="cpu").tokenizer, ByteCaptionTokenizer)
    # a fitted vocabulary without its file: a one-line error, not a new vocabulary
    fitted = loop.train(_folder_cfg(tmp_path, folder, "fitted"), stop_at_step=1, log=lambda m: None)
    _drop_tokenizer_files(fitted.run_dir)
    with pytest.raises(ConfigError, match="fitted on its training captions and its text_tokenizer.json"):
        loop.train(_folder_cfg(tmp_path, folder, "fitted"), resume=fitted.run_dir, log=lambda m: None)



def test_a_users_own_caption_set_with_a_fitted_vocabulary_sizes_the_encoder(tmp_path):
    from ditkit.data.captions import load_captioned_folder, caption_pairs

    folder = _caption_folder(tmp_path)
    scenes = load_captioned_folder(str(folder), 16, 3)
    own = CaptionTokenizer.fit(["a red card", "ein blaues Bild ü", "extra words of my own"])  # 12 words + 3 specials
    cfg = _folder_cfg(tmp_path, folder, "own")
    run = loop.train(cfg, dataset=caption_pairs(scenes, own), log=lambda m: None).run_dir
    pipe = ditkit.load(run, device="cpu")
    assert pipe.cfg.data.caption_vocab_size == own.vocab_size == 15 == pipe.model.text_encoder.vocab_size
    assert pipe.tokenizer.hf.get_vocab() == own.hf.get_vocab()


def test_a_prompt_model_fine_tunes_from_a_prompt_run_with_its_tokenizer_lora_and_merge(tmp_path, run_dir):
    """--init-from a shapes_captions run (grammar words, 259-row encoder) onto a captioned folder whose
    words the grammar never wrote: the new run keeps the source's tokenizer and encoder size (fitting a
    vocabulary on the folder would remap every id), its LoRA base is the source's EMA, and ``lora merge``
    carries the tokenizer into the merged run."""
    from ditkit.interop import InteropError, init_from

    base_ema = _weights(run_dir)[1]
    folder = _caption_folder(tmp_path)
    def lora_cfg(**data):
        cfg = _folder_cfg(tmp_path, folder, "lora", image_size=32, **data)
        cfg.train.init_from, cfg.train.lora_rank = str(run_dir), 4
        return cfg

    with pytest.raises(ConfigError, match="reads captions with caption_tokenizer='grammar'"):  # asked for another kind
        loop.train(lora_cfg(caption_tokenizer="bytes"), log=lambda m: None)
    lora = loop.train(lora_cfg(), stop_at_step=1, log=lambda m: None).run_dir
    # resumed from Python with the config it started from (whose tokenizer fields say "auto")
    assert loop.train(lora_cfg(), resume=lora, log=lambda m: None).step == 2
    source_tokenizer = (run_dir / "text_tokenizer.json").read_text(encoding="utf-8")
    assert (lora / "text_tokenizer.json").read_text(encoding="utf-8") == source_tokenizer
    pipe = ditkit.load(lora, device="cpu")
    assert pipe.cfg.data.caption_tokenizer == "grammar" and pipe.cfg.data.caption_vocab_size is None
    assert pipe.model.text_encoder.vocab_size == 259 and json.loads((lora / "init_from.json").read_text())["kind"] == "ditkit"
    assert pipe("a red square", num_inference_steps=2).tensors.shape == (1, 3, 32, 32)
    without = ditkit.load(lora, device="cpu")
    without.unload_lora()  # the base under the adapter is the source's EMA: the same draw as the source
    draw = dict(num_inference_steps=2, generator=torch.Generator().manual_seed(3))
    same = ditkit.load(run_dir, device="cpu")("a red square", **draw).tensors
    assert torch.equal(without("a red square", **{**draw, "generator": torch.Generator().manual_seed(3)}).tensors, same)
    merged = tmp_path / "merged"
    assert main(["lora", "merge", str(run_dir), str(lora), "--out", str(merged)]) == 0
    assert (merged / "text_tokenizer.json").read_text(encoding="utf-8") == source_tokenizer
    assert ditkit.load(merged, device="cpu").tokenizer.hf.get_vocab() == pipe.tokenizer.hf.get_vocab()
    # a plain full fine-tune starts from the source's EMA weights exactly
    from ditkit.builders import build_model

    base_cfg = ditkit.load(run_dir, device="cpu").cfg
    fresh = build_model(base_cfg)
    record = init_from(fresh, run_dir)
    assert record["kind"] == "ditkit" and all(torch.equal(fresh.state_dict()[k], v) for k, v in base_ema.items())
    with pytest.raises(InteropError, match="class-map is for class DiT models"):
        init_from(fresh, run_dir, class_map={0: 1})
    base_cfg.model.name = base_cfg.model.name.replace("/4", "/2")  # another patch size: named keys
    with pytest.raises(InteropError, match="does not fit the model"):
        init_from(build_model(base_cfg), run_dir)
