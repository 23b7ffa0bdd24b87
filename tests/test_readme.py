"""The README's Python examples run as written: the pipeline example on small runs named as the
README names them (results/digits, results/sums, trained here for a few steps), and the low-level
example as it is."""

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def readme_runs(tmp_path):
    """results/digits and results/sums under a temporary working directory (a few steps each)."""
    from ditkit.config import apply_overrides
    from ditkit.recipes import get_recipe
    from ditkit.train.loop import train

    short = {"run.results_dir": str(tmp_path / "results"), "train.max_steps": 2, "train.sample_every": 0,
             "train.eval_every": 0, "run.tensorboard": False, "train.log_every": 1}
    train(apply_overrides(get_recipe("digits"), {**short, "run.run_name": "digits", "train.global_batch_size": 16}))
    train(apply_overrides(get_recipe("text_sums"), {**short, "run.run_name": "sums", "data.synthetic_docs": 400}))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    yield tmp_path
    os.chdir(cwd)


def test_readme_python_examples_run(readme_runs, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2, "README lost its python examples"
    assert any("ditkit.load(\"results/digits\")" in b and "ditkit.load(\"results/sums\")" in b for b in blocks)
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "torch.Size([4, 3, 16, 16])" in out  # the low-level example
    assert "ddpm ema" in out  # the pipeline example printed its metadata
    assert (readme_runs / "digit_1.png").is_file()
