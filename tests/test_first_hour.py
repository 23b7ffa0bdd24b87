"""What a new user hit in the first hour (issue 14, parts 3 and 5), each turned into a check:
the unconditional branch shown by ``ditkit info`` and refused by ``ditkit eval``, errors that name
the user's own flag, Ctrl-C while sampling, the user's-own-images recipe sized for the data with a
time estimate, lossy image conversions warned, and a README a new user can follow."""

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ditkit.cli import EXIT_INTERRUPTED, EXIT_USAGE, build_parser, main
from ditkit.cli.info import unconditional_branch
from ditkit.checkpoint_io import Checkpoint
from ditkit.recipes import get_recipe, size_for_dataset

REPO = Path(__file__).resolve().parents[1]
TINY = ["train", "--recipe", "shapes_tiny", "--max-steps", "2", "--ckpt-every", "2", "--log-every", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny run with the default label dropout (left unset: the DiT default 0.1) and one without."""
    root = tmp_path_factory.mktemp("runs")
    assert main([*TINY, "--results-dir", str(root), "--run-name", "dropout"]) == 0
    assert main([*TINY, "--results-dir", str(root), "--run-name", "nodropout", "--set", "model.class_dropout_prob=0"]) == 0
    return root


def image_folder(root: Path, per_class: int = 20, size: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for name in ("cats", "dogs"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


# ---- part 3: the unconditional branch, recorded and visible --------------------------------------


def test_info_shows_whether_the_unconditional_branch_was_trained(runs, capsys):
    assert Checkpoint.open(runs / "dropout").config.model.class_dropout_prob is None  # the default, not written
    assert main(["info", str(runs / "dropout")]) == 0
    assert "unconditional branch: trained (class_dropout_prob 0.1)" in capsys.readouterr().out
    assert main(["info", str(runs / "nodropout")]) == 0
    assert "unconditional branch: not trained (class_dropout_prob 0)" in capsys.readouterr().out
    assert main(["info", "--json", str(runs / "nodropout")]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["unconditional_branch"]["trained"] is False and facts["unconditional_branch"]["class_dropout_prob"] == 0.0


def test_unconditional_models_have_no_branch_to_report():
    cfg = get_recipe("shapes_tiny")
    cfg.data.channels, cfg.data.num_classes = 3, 0
    assert unconditional_branch(cfg)["trained"] is None
    cfg.data.num_classes, cfg.model.class_dropout_prob = 4, 0.25
    assert unconditional_branch(cfg) == {"trained": True, "class_dropout_prob": 0.25, "text": "trained (class_dropout_prob 0.25)"}
    prompts = get_recipe("shapes_captions")  # prompt models: caption dropout is their unconditional branch
    prompts.data.caption_dropout = 0.0
    assert unconditional_branch(prompts)["trained"] is False and "caption_dropout 0" in unconditional_branch(prompts)["text"]


def test_eval_refuses_guidance_without_a_trained_unconditional_branch(runs, tmp_path, capsys):
    code = main(["eval", "--ckpt", str(runs / "nodropout"), "--cfg-scale", "4", "--num-samples", "10",
                 "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "--cfg-scale 1" in err and "--allow-untrained-uncond" in err
    assert not (tmp_path / "cache").exists()  # refused before any work (no classifier trained)


# ---- part 5: small ones ----------------------------------------------------------------------------


def test_help_describes_info():
    text = build_parser().format_help()
    assert re.search(r"info\s+describe a run or checkpoint", text) and "inspect" not in text


def test_info_and_resume_errors_name_their_own_flag(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--ckpt" not in err and str(tmp_path / "missing") in err
    assert main(["train", "--resume", str(tmp_path / "missing")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--resume" in err and "--ckpt" not in err


def test_ctrl_c_while_sampling_does_not_talk_about_checkpoints(runs, tmp_path, capsys, monkeypatch):
    from ditkit.pipelines.image import ImagePipeline

    def interrupted(self, args, distributed=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(ImagePipeline, "cli_call", interrupted)
    code = main(["sample", "--ckpt", str(runs / "dropout"), "--num-samples", "2", "--out-dir", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == EXIT_INTERRUPTED and "aborted" in err and "checkpoint" not in err


# ---- part 5: the user's own images get a recipe sized for them --------------------------------------


@pytest.mark.parametrize("num_images, batch, steps", [
    (10, 4, 500), (40, 16, 500), (100, 32, 600), (1797, 128, 2800), (100_000, 128, 3000), (1, 1, 500),
])
def test_size_for_dataset(num_images, batch, steps):
    t = size_for_dataset(get_recipe("own_images"), num_images).train
    assert (t.global_batch_size, t.max_steps) == (batch, steps)
    assert t.global_batch_size <= max(1, num_images // 2) and t.ckpt_every <= t.max_steps and t.warmup_steps < t.max_steps


def test_data_without_a_recipe_uses_the_sized_recipe_and_flags_still_win(tmp_path, capsys):
    folder = image_folder(tmp_path / "imgs")  # 40 images: the digits recipe's batch 128 would not fit
    assert main(["train", "--data", str(folder), "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["recipe"] == "own_images" and cfg["train"]["global_batch_size"] == 16 and cfg["train"]["max_steps"] == 500
    assert main(["train", "--data", str(folder), "--global-batch-size", "8", "--max-steps", "7", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["train"]["global_batch_size"] == 8 and cfg["train"]["max_steps"] == 7
    assert main(["train", "--recipe", "digits", "--data", str(folder), "--print-config"]) == 0  # a named recipe is kept
    assert json.loads(capsys.readouterr().out)["train"]["global_batch_size"] == 128


def test_training_on_own_images_prints_sizes_and_a_measured_estimate_first(tmp_path, capsys):
    folder = image_folder(tmp_path / "imgs")
    code = main(["train", "--data", str(folder), "--model", "DiT-T/4", "--image-size", "16", "--max-steps", "2",
                 "--ckpt-every", "2", "--sample-every", "0", "--precision", "fp32", "--results-dir", str(tmp_path / "r"),
                 "--run-name", "mine"])
    out = capsys.readouterr().out
    assert code == 0
    assert "recipe own_images for 40 images" in out and "batch 16, 2 steps" in out
    estimate = re.search(r"estimated training time: .* \(([0-9.]+) s/step measured here", out)
    assert estimate and float(estimate.group(1)) > 0
    assert out.index("estimated training time") < out.index("run: ")


def test_a_text_file_without_a_recipe_asks_for_a_text_recipe(tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text("hello world\n" * 50)
    assert main(["train", "--data", str(tmp_path / "corpus.txt"), "--print-config"]) == EXIT_USAGE
    assert "--recipe pydoc_char" in capsys.readouterr().err


def test_lossy_image_conversions_are_warned_through_the_cli(tmp_path):
    folder = image_folder(tmp_path / "imgs", size=16)
    Image.fromarray(np.zeros((16, 16, 4), np.uint8)).save(folder / "cats" / "transparent.png")  # alpha 0
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(folder / "dogs" / "tiny.png")  # 1x1 -> 16x16
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train", "--recipe", "shapes_tiny", "--data", str(folder), "--max-steps", "1", "--ckpt-every", "1",
                     "--results-dir", str(tmp_path / "r"), "--run-name", "lossy"]) == 0
    messages = [str(w.message) for w in caught]
    assert any("dropped the alpha channel of 1 image" in m for m in messages)
    assert any("enlarged 1 image" in m for m in messages)


# ---- part 5: the README a new user follows --------------------------------------------------------


def readme_shell_lines() -> list[tuple[int, str]]:
    """(block index, command line) for every bash block outside the tested Python API section."""
    text = (REPO / "README.md").read_text().split("## Python API")[0]
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    return [(i, line.strip()) for i, block in enumerate(blocks) for line in block.splitlines() if line.strip()]


def test_readme_commands_run_from_the_venv():
    lines = readme_shell_lines()
    activated = next((i for i, line in lines if line.startswith("source .venv/bin/activate")), None)
    for block, line in lines:
        first = line.split()[0]
        if first in ("ditkit", "pip", "torchrun", "python"):
            assert activated is not None and block >= activated, f"README runs `{line}` without the .venv"
    assert "pip install -e '.[serve]'" not in (REPO / "README.md").read_text()  # the dev extras include serve


def test_readme_facts_a_new_user_checked():
    text = (REPO / "README.md").read_text()
    assert "AVX512-BF16" in text and "AMX" in text
    sums = re.search(r"--recipe text_sums[^\n]*#([^\n]*)", text)
    assert sums and "seconds" not in sums.group(1) and re.search(r"\d+ ?(s|min)", sums.group(1))
    own = text.split("## Your own images")[1].split("##")[0]
    assert "own_images" in own and "--recipe digits" not in own


def test_docs_serve_uses_run_names_the_readme_creates():
    readme = (REPO / "README.md").read_text()
    created = set(re.findall(r"--run-name ([A-Za-z0-9_.-]+)", readme)) | {"dit-xl"}  # import-dit --out results/dit-xl
    used = set(re.findall(r"results/([A-Za-z0-9_.-]+)", (REPO / "docs" / "serve.md").read_text()))
    assert used and used <= created, f"docs/serve.md uses runs the README never creates: {sorted(used - created)}"
