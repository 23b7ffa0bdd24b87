"""Pipelines announce the network calls of a run before it starts (``ditkit.progress.announce_total``),
and then report exactly that many (at most that many for masked text, which may skip calls): the
one count the CLI's bar and the server's job use."""

from pathlib import Path

import pytest
import torch

import ditkit
from ditkit.progress import announce_total
from ditkit.recipes import get_recipe
from ditkit.samplers.inpaint import resample_num_calls

TEXT_CKPT = Path(__file__).parent / "fixtures" / "outputs" / "text_ckpt"  # masked TextDiT, seq_len 24


class Counter:
    def __init__(self) -> None:
        self.totals: list[int] = []
        self.done = 0

    def __call__(self, k: int = 1) -> None:
        self.done += k

    def set_total(self, total: int) -> None:
        self.totals.append(total)


@pytest.fixture(scope="module")
def image_pipe(tmp_path_factory):
    from ditkit.train.loop import train

    cfg = get_recipe("shapes_tiny")
    cfg.run.results_dir, cfg.run.run_name, cfg.train.max_steps = str(tmp_path_factory.mktemp("runs")), "tiny", 1
    return ditkit.load(train(cfg, log=lambda m: None).run_dir, device="cpu")


def test_a_plain_callable_is_left_alone():
    announce_total(lambda k: None, 5)  # no set_total: nothing to tell


@pytest.mark.parametrize("control, calls_per_batch", [
    ({}, 4),
    ({"strength": 0.5}, 2),  # SDEdit keeps the last half of the grid
    ({"mask": True, "jump_length": 2, "jump_n_sample": 2}, resample_num_calls(4, 2, 2)),  # RePaint jumps add calls
])
def test_image_pipeline_announces_and_reports_its_calls(image_pipe, control, calls_per_batch):
    size = image_pipe.cfg.data.image_size
    kwargs = {}
    if control:
        kwargs["image"] = torch.zeros(1, 3, size, size).expand(3, -1, -1, -1)
    if control.pop("mask", False):
        mask = torch.zeros(3, 1, size, size)
        mask[..., : size // 2] = 1
        kwargs["mask_image"] = mask
    counter = Counter()
    image_pipe(class_labels=[0, 1, 2], num_inference_steps=4, batch_size=2, guidance_scale=1.0, progress=counter,
               **kwargs, **control)
    assert counter.totals == [2 * calls_per_batch] and counter.done == 2 * calls_per_batch  # 2 batches


def test_text_pipeline_announces_an_upper_bound_of_its_calls():
    pipe = ditkit.load(TEXT_CKPT, device="cpu")
    seq_len = pipe.cfg.data.seq_len
    counter = Counter()
    pipe(num_samples=3, num_inference_steps=5, batch_size=2, seed=0, progress=counter)
    assert counter.totals == [2 * 5] and 0 < counter.done <= 10
    counter = Counter()  # three windows of a semi-autoregressive run
    pipe(num_tokens=2 * seq_len, stride=seq_len // 2, num_inference_steps=4, seed=0, progress=counter)
    assert counter.totals == [3 * 4] and 0 < counter.done <= 12
