"""benchmarks/text_to_image.py's pure parts (issue 15): the worker command carries the run's settings,
medians over seeds, the curves figure. No training here (the script itself is run by hand; its
numbers are in docs/text_to_image.md)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "text_to_image.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("text_to_image_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _scores(success, fd, shape=0.25):
    split = {"success": success, "accuracy": {"shape": shape, "colour": 0.5, "size": 0.75, "relation": None}}
    return {"in_distribution": split, "held_out": {**split, "success": success / 2}, "FD (judge features)": fd,
            "images_per_second": 20.0}


def _run(variant, seed, points):
    curve = [{"step": 1000 * (i + 1), "train_s": 150.0 * (i + 1), **_scores(s, fd)} for i, (s, fd) in enumerate(points)]
    return {"variant": variant, "seed": seed, "final": curve[-1], "curve": curve}


def test_the_worker_gets_the_run_settings_but_not_the_scheduling(bench):
    args = bench.build_parser().parse_args(["--budget", "10m", "--seeds", "2", "--jobs", "2", "--curve-every", "500",
                                            "--variants", "cross,class", "--num-prompts", "50"])
    cmd = bench.worker_command(args, "class", 1)
    assert cmd[0] == sys.executable and Path(cmd[1]) == SCRIPT
    assert cmd[2:4] == ["--worker", "class:1"]
    forwarded = dict(zip(cmd[4::2], cmd[5::2]))
    assert forwarded["--budget"] == "10m" and forwarded["--curve-every"] == "500" and forwarded["--num-prompts"] == "50"
    assert not {"--seeds", "--jobs", "--variants", "--worker"} & set(forwarded)
    # what the worker parses back is what the parent was given
    back = bench.build_parser().parse_args(cmd[2:])
    assert (back.worker, back.budget, back.curve_every, back.num_prompts) == ("class:1", "10m", 500, 50)


def test_summary_quotes_medians_over_seeds_and_writes_the_table(bench, tmp_path):
    results = [_run("cross", 0, [(0.0, 300.0), (0.10, 60.0)]), _run("cross", 1, [(0.02, 200.0), (0.30, 40.0)]),
               _run("cross", 2, [(0.05, 100.0), (0.20, 50.0)]), _run("class", 0, [(0.4, 30.0)])]
    table = bench.summarise(results, tmp_path)
    medians = json.loads((tmp_path / "results.json").read_text())["medians"]
    assert medians["cross"]["in_dist_success"] == pytest.approx(0.20) and medians["cross"]["fd"] == pytest.approx(50.0)
    assert medians["cross"]["held_out_success"] == pytest.approx(0.10) and medians["cross"]["seeds"] == 3
    assert medians["cross"]["relation"] is None and medians["class"]["in_dist_success"] == pytest.approx(0.4)
    assert "| cross (T2I-CrossDiT-T/4) | 3 | 2000 | 0.200 | 0.100 | 0.250 | 0.500 | 0.750 | - | 50.0 | 20.0 |" in table
    assert (tmp_path / "table.md").read_text() == table
    bench.plot_curves(results, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
