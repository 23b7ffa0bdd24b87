"""The attribute judge's scoring (GenEval-style success, per-axis accuracy, matching, relations),
its training targets and detection decoding, and FD (judge features) with its real-vs-real floor."""

import numpy as np
import pytest
import torch

from ditkit.data.captions import SHAPES, shapes_captions
from ditkit.eval import attributes as A


def _obj(shape, colour, size, x, y):
    return {"shape": shape, "colour": colour, "size": size, "x": x, "y": y}


RECORD = {"objects": [_obj("circle", "red", "small", 0, 0), _obj("square", "blue", "large", 0, 0)], "relation": "left of"}


def test_success_needs_count_attributes_and_relation():
    right = [_obj("square", "blue", "large", 24, 10), _obj("circle", "red", "small", 6, 12)]  # any order
    v = A.score_prompt(RECORD, right)
    assert v["success"] and v["count"] and v["relation"] and v["colour"] == [True, True]
    swapped = [_obj("square", "blue", "large", 6, 10), _obj("circle", "red", "small", 24, 12)]
    v = A.score_prompt(RECORD, swapped)
    assert not v["success"] and v["relation"] is False and all(v["shape"])
    wrong_colour = [_obj("circle", "green", "small", 6, 12), _obj("square", "blue", "large", 24, 10)]
    v = A.score_prompt(RECORD, wrong_colour)
    assert not v["success"] and v["colour"] == [False, True] and v["shape"] == [True, True]
    extra = right + [_obj("cross", "white", "small", 16, 28)]  # a third, less sure detection
    assert not A.score_prompt(RECORD, extra)["success"] and not A.score_prompt(RECORD, extra)["count"]
    blobs = A.score_prompt(RECORD, [_obj("cross", "white", "small", 1, 1)] * 3 + right)  # surest first
    assert blobs["shape"] == [False, False] and not blobs["count"]  # no lucky match among many blobs
    missing = A.score_prompt(RECORD, right[:1])
    assert not missing["success"] and missing["relation"] is False and missing["shape"].count(True) == 1
    one = {"objects": [_obj("triangle", "yellow", "large", 0, 0)], "relation": None}
    assert A.score_prompt(one, [_obj("triangle", "yellow", "large", 9, 9)]) == {
        "count": True, "shape": [True], "colour": [True], "size": [True], "relation": None, "success": True}


def test_score_images_aggregates_per_axis():
    records = [RECORD, {"objects": [_obj("cross", "white", "small", 0, 0)], "relation": None}]

    class Fixed:  # a judge stand-in: detect() reads predictions from these per-cell maps
        pass

    found = [[_obj("circle", "red", "small", 6, 12), _obj("square", "blue", "large", 24, 10)], []]
    orig = A.detect
    try:
        A.detect = lambda judge, images: found
        res = A.score_images(Fixed(), torch.zeros(2, 3, 32, 32), records)
    finally:
        A.detect = orig
    assert res["success"] == 0.5 and res["success_two_objects"] == 1.0 and res["success_one_object"] == 0.0
    assert res["accuracy"]["count"] == 0.5 and res["accuracy"]["shape"] == pytest.approx(2 / 3)
    assert res["accuracy"]["relation"] == 1.0


def test_targets_decode_back_through_detect():
    data = shapes_captions(6, seed=2, split="all", num_captions=1)
    target = A._targets(data.records, 32)
    assert target["obj"].sum() == sum(len(r["objects"]) for r in data.records)
    judge = A.AttributeJudge()

    def perfect(x):  # logits that say exactly the targets
        out = torch.full((len(x), sum(A._HEADS), 4, 4), -20.0)
        out[:, 0] = target["obj"] * 40 - 20
        base = 1
        for key, n in (("shape", 4), ("colour", 6), ("size", 2)):
            onehot = torch.nn.functional.one_hot(target[key].clamp_min(0), n).permute(0, 3, 1, 2).float()
            out[:, base: base + n] = onehot * 40 - 20
            base += n
        out[:, base: base + 2] = torch.logit(target["offset"].clamp(1e-4, 1 - 1e-4))
        return out

    judge.forward = perfect
    found = A.detect(judge, data.pixels())
    for rec, objs in zip(data.records, found):
        assert A.score_prompt(rec, objs)["success"]
        for o in rec["objects"]:
            assert min(abs(d["x"] - o["x"]) + abs(d["y"] - o["y"]) for d in objs) < 1e-2
    assert SHAPES[0] == "circle"


def test_fd_in_judge_features_is_zero_for_the_same_set_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    assert A._fd(a, a) == pytest.approx(0.0, abs=1e-6)
    floor = A._fd(a, b)
    assert 0 < floor < A._fd(a, b + 1.0)
    assert A.FD_NAME == "FD (judge features)"
