"""`ditkit serve` HTTP API, driven with httpx against the ASGI app (no socket): every endpoint, a
4xx with a clear message for each class of bad input, 503 + Retry-After under overload while
/health answers, 504 on timeout with the job stopped, and a worker that survives failures."""

import asyncio
import base64
import io
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

from ditkit.cli import main as cli_main  # noqa: E402
from ditkit.config import ConfigError  # noqa: E402
from ditkit.recipes import get_recipe  # noqa: E402
import ditkit  # noqa: E402
from ditkit.registry import SAMPLERS  # noqa: E402
from ditkit.media import to_uint8  # noqa: E402
from ditkit.serve.app import create_app  # noqa: E402
from ditkit.serve.launch import load_models  # noqa: E402
from ditkit.serve.limits import ServeLimits  # noqa: E402
from ditkit.serve.models import parse_ckpt_arg  # noqa: E402
from ditkit.serve.workers import Job, ModelWorker, QueueFullError  # noqa: E402
from ditkit.train.loop import train  # noqa: E402

IMG, UNCOND, TXT = "shapes", "uncond", "sums"


def _train(root, name, recipe, **changes):
    cfg = get_recipe(recipe)
    cfg.run.results_dir, cfg.run.run_name = str(root), name
    cfg.train.max_steps, cfg.train.ckpt_every, cfg.train.log_every = 2, 2, 1
    for key, value in changes.items():
        section, field = key.split("__")
        setattr(getattr(cfg, section), field, value)
    return train(cfg, log=lambda line: None).run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_runs")
    return {
        IMG: _train(root, "img", "shapes_tiny"),
        UNCOND: _train(root, "uncond", "shapes_tiny", data__num_classes=0),
        TXT: _train(root, "txt", "text_sums", data__synthetic_docs=300),
    }


@pytest.fixture(scope="module")
def models(runs):
    return load_models([f"{name}={path}" for name, path in runs.items()], device="cpu")


@pytest.fixture
def serve(models):
    """``serve(limits) -> (app, AsyncClient factory)``; workers stopped after the test."""
    apps = []

    def make(limits=None, blocklist=None):
        app = create_app(models, limits or ServeLimits(max_queue=4, request_timeout_s=30), blocklist=blocklist)
        apps.append(app)
        return app, lambda: httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")

    yield make
    for app in apps:
        app.state.ditkit.close()


def run(coro):
    return asyncio.run(coro)


def _png(item):
    return Image.open(io.BytesIO(base64.b64decode(item["png_base64"])))


# ---- endpoints -------------------------------------------------------------------------------------


def test_health_models_and_openapi(serve):
    app, client = serve()

    async def go():
        async with client() as c:
            return await c.get("/health"), await c.get("/v1/models"), await c.get("/openapi.json")

    health, listed, schema = run(go())
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert set(health.json()["models"]) == {IMG, UNCOND, TXT}
    by_name = {m["name"]: m for m in listed.json()["models"]}
    img = by_name[IMG]
    assert img["modality"] == "image" and img["image_size"] == 16 and img["channels"] == 3
    assert [c["name"] for c in img["classes"]] == ["circle", "square", "triangle", "cross"]
    assert img["samplers"] == SAMPLERS.names(family="gaussian") and img["defaults"]["sampler"] == "dpm++"
    assert {"ddpm", "ddim", "dpm++"} <= set(img["samplers"]) and "heun" not in img["samplers"]
    assert img["limits"]["max_images_per_request"] == 16 and img["limits"]["max_steps"] == 250
    assert "checkpoint" not in img  # no server paths in the model list
    assert by_name[UNCOND]["conditional"] is False and by_name[UNCOND]["classes"] == []
    assert by_name[TXT]["modality"] == "text" and by_name[TXT]["supports_infill"] is True
    paths = schema.json()["paths"]
    assert {"/health", "/v1/models", "/v1/images", "/v1/text", "/v1/progress/{request_id}"} <= set(paths)
    assert "ImageRequest" in schema.json()["components"]["schemas"]


def test_images_are_the_pngs_ditkit_sample_would_write(serve, runs):
    app, client = serve()
    body = {"model": IMG, "num_images": 3, "class_labels": ["circle", 2], "steps": 3, "seed": 5, "cfg_scale": 1.5}

    async def go():
        async with client() as c:
            return await c.post("/v1/images", json=body)

    r = run(go())
    assert r.status_code == 200, r.text
    out = r.json()
    expected = ditkit.load(runs[IMG], device="cpu")(class_labels=[0, 2], num_samples=3, num_inference_steps=3, seed=5,
                                                     guidance_scale=1.5)
    assert [im["seed"] for im in out["images"]] == [5, 6, 7]
    assert [im["label"] for im in out["images"]] == [0, 2, 0]
    assert out["images"][0]["class_name"] == "circle"
    assert out["metadata"] == expected.metadata  # the same metadata as `ditkit sample`
    pixels = to_uint8(expected.tensors)
    for i, item in enumerate(out["images"]):
        png = _png(item)
        assert png.size == (16, 16) and png.mode == "RGB"
        assert np.array_equal(np.asarray(png), pixels[i])  # same pixels as generate() on the checkpoint
        assert png.text == expected.sample_metadata(i)  # metadata inside the PNG, as ditkit sample writes it


def test_unconditional_model_and_defaults(serve):
    app, client = serve()

    async def go():
        async with client() as c:
            ok = await c.post("/v1/images", json={"model": UNCOND, "steps": 2})
            labelled = await c.post("/v1/images", json={"model": UNCOND, "class_labels": [1]})
            return ok, labelled

    ok, labelled = run(go())
    assert ok.status_code == 200 and len(ok.json()["images"]) == 1 and ok.json()["images"][0]["label"] is None
    assert labelled.status_code == 422 and "unconditional" in labelled.json()["detail"]


def test_text_prompt_and_infill_template(serve):
    app, client = serve()

    async def go():
        async with client() as c:
            a = await c.post("/v1/text", json={"model": TXT, "prompt": "12+", "length": 10, "seed": 3, "num_samples": 2})
            b = await c.post("/v1/text", json={"model": TXT, "prompt": "12+", "length": 10, "seed": 3, "num_samples": 2})
            t = await c.post("/v1/text", json={"model": TXT, "template": "7+__=__", "seed": 1, "steps": 4})
            return a, b, t

    a, b, t = run(go())
    assert a.status_code == 200, a.text
    samples = a.json()["samples"]
    assert [s["seed"] for s in samples] == [3, 4]
    assert all(s["text"].startswith("12+") and len(s["text"]) == 13 for s in samples)  # prompt + 10 characters
    assert samples == b.json()["samples"]  # seeded: the same request gives the same text
    assert t.status_code == 200, t.text
    text = t.json()["samples"][0]["text"]
    assert len(text) == 7 and text[:2] == "7+" and text[4] == "=" and "_" not in text  # fixed characters kept
    assert t.json()["metadata"]["infill"] == "7+__=__"


def test_page_and_static_files(serve):
    app, client = serve()

    async def go():
        async with client() as c:
            return await c.get("/"), await c.get("/static/app.js"), await c.get("/static/style.css")

    page, script, style = run(go())
    assert page.status_code == 200 and 'id="generate"' in page.text and 'src="/static/app.js"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert script.status_code == 200 and "/v1/images" in script.text
    assert style.status_code == 200


# ---- bad input -------------------------------------------------------------------------------------

BAD_IMAGE_REQUESTS = [
    # wrong types
    ({"model": IMG, "steps": "ten"}, 422, "steps: Input should be a valid integer"),
    ({"model": IMG, "num_images": 2.5}, 422, "num_images"),
    ({"model": IMG, "seed": True}, 422, "seed"),
    ({"model": IMG, "class_labels": "circle"}, 422, "class_labels"),
    ({"model": IMG, "cfg_scale": "high"}, 422, "cfg_scale"),
    ({"model": 7}, 422, "model"),
    ({"steps": 3}, 422, "model: required"),
    ({"model": IMG, "guidance": 3}, 422, "guidance: unknown field"),
    # out of range / over a limit
    ({"model": IMG, "num_images": 0}, 422, "num_images=0"),
    ({"model": IMG, "num_images": 17}, 422, "max_images_per_request"),
    ({"model": IMG, "steps": 0}, 422, "steps=0"),
    ({"model": IMG, "steps": 251}, 422, "max_steps"),
    ({"model": IMG, "cfg_scale": 20.5}, 422, "min_cfg_scale..max_cfg_scale"),
    ({"model": IMG, "cfg_scale": -1}, 422, "cfg_scale=-1"),
    ({"model": IMG, "seed": -1}, 422, "seed=-1"),
    ({"model": IMG, "seed": 2**40}, 422, "seed="),
    ({"model": IMG, "class_labels": [4]}, 422, "class_labels: class label 4 is outside this checkpoint's classes 0..3"),
    ({"model": IMG, "class_labels": ["dog"]}, 422, "'dog' is not a class"),
    ({"model": IMG, "sampler": "euler"}, 422, "use one of ddpm, ddim, dpm++"),
    ({"model": IMG, "request_id": "not an id!"}, 422, "request_id"),
    # unknown model / wrong endpoint for the model
    ({"model": "nope"}, 404, "model 'nope' is not served here; available: shapes, uncond, sums"),
    ({"model": TXT}, 422, "send this request to POST /v1/text"),
    # oversize within the body limit
    ({"model": IMG, "class_labels": [0] * 1000}, 422, "max_images_per_request"),
]


@pytest.mark.parametrize("body, status, message", BAD_IMAGE_REQUESTS, ids=[str(i) for i in range(len(BAD_IMAGE_REQUESTS))])
def test_bad_image_requests_get_a_clear_4xx(serve, body, status, message):
    app, client = serve()

    async def go():
        async with client() as c:
            return await c.post("/v1/images", json=body)

    r = run(go())
    assert r.status_code == status, r.text
    assert message in r.json()["detail"], r.json()


BAD_TEXT_REQUESTS = [
    ({"model": TXT, "prompt": "1" * 2001}, 422, "max_prompt_chars"),
    ({"model": TXT, "length": 1025}, 422, "max_text_length"),
    ({"model": TXT, "num_samples": 9}, 422, "max_text_samples"),
    ({"model": TXT, "prompt": "1+", "template": "1_"}, 422, "either prompt or template"),
    ({"model": TXT, "template": "1_", "length": 4}, 422, "drop length"),
    ({"model": TXT, "template": "no blanks"}, 422, "template"),
    ({"model": TXT, "prompt": "héllo"}, 422, "not in the vocabulary"),
    ({"model": TXT, "temperature": 11.0}, 422, "max_temperature"),
    ({"model": TXT, "class_label": 0}, 422, "unconditional"),
    ({"model": TXT, "prompt": 12}, 422, "prompt: Input should be a valid string"),
    ({"model": IMG, "prompt": "1+"}, 422, "send this request to POST /v1/images"),
]


@pytest.mark.parametrize("body, status, message", BAD_TEXT_REQUESTS, ids=[str(i) for i in range(len(BAD_TEXT_REQUESTS))])
def test_bad_text_requests_get_a_clear_4xx(serve, body, status, message):
    app, client = serve()

    async def go():
        async with client() as c:
            return await c.post("/v1/text", json=body)

    r = run(go())
    assert r.status_code == status, r.text
    assert message in r.json()["detail"], r.json()


def test_malformed_and_oversize_bodies(serve):
    app, client = serve(ServeLimits(max_body_bytes=1000))

    async def chunks():
        for _ in range(20):
            yield b'{"model": "shapes", "class_labels": [' + b"0," * 50

    async def go():
        async with client() as c:
            bad_json = await c.post("/v1/images", content=b'{"model": ', headers={"content-type": "application/json"})
            nan = await c.post("/v1/images", content=b'{"model": "shapes", "cfg_scale": NaN}',
                               headers={"content-type": "application/json"})
            big = await c.post("/v1/images", json={"model": IMG, "class_labels": [0] * 600})
            streamed = await c.post("/v1/images", content=chunks(), headers={"content-type": "application/json"})
            return bad_json, nan, big, streamed

    bad_json, nan, big, streamed = run(go())
    assert bad_json.status_code == 422 and "not valid JSON" in bad_json.json()["detail"]
    assert nan.status_code == 422 and "finite number" in nan.json()["detail"]
    assert big.status_code == 413 and "1000 bytes (max_body_bytes)" in big.json()["detail"]
    assert "content-length" not in streamed.request.headers  # the chunked path is checked while reading
    assert streamed.status_code == 413


# ---- load ------------------------------------------------------------------------------------------


class _Patched:
    """A served pipeline whose call is replaced (every other attribute is the real one's)."""

    def __init__(self, real, call):
        self._real, self._call = real, call

    def __getattr__(self, name):
        return getattr(self._real, name)

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)


def _block_generation(monkeypatch, model, release: threading.Event, started: threading.Event):
    """Make the model's generation wait for ``release`` (then draw the real images)."""
    real = model.pipeline

    def slow(**kwargs):
        started.set()
        assert release.wait(20), "test never released the generation"
        return real(**kwargs)

    monkeypatch.setattr(model, "pipeline", _Patched(real, slow))


def test_overload_answers_503_with_retry_after_while_health_answers(serve, models, monkeypatch):
    app, client = serve(ServeLimits(max_queue=1, request_timeout_s=30))
    state = app.state.ditkit
    release, started = threading.Event(), threading.Event()
    _block_generation(monkeypatch, state.models[IMG], release, started)
    body = {"model": IMG, "steps": 2, "num_images": 1}

    async def go():
        async with client() as c:
            first = asyncio.create_task(c.post("/v1/images", json={**body, "request_id": "first"}))
            deadline = time.monotonic() + 30
            while not started.is_set():  # the first request is running on the worker
                assert time.monotonic() < deadline, "the first request never started"
                await asyncio.sleep(0.01)
            second = asyncio.create_task(c.post("/v1/images", json=body))
            while state.workers[IMG].stats()["queued"] < 1:  # ... and the second one waits
                assert time.monotonic() < deadline, "the second request never queued"
                await asyncio.sleep(0.01)
            third = await c.post("/v1/images", json=body)
            refused_while_busy = not release.is_set() and not first.done()  # answered before the queue moved
            health = await c.get("/health")
            other_model = await c.post("/v1/images", json={"model": UNCOND, "steps": 2})
            progress = await c.get("/v1/progress/first")
            release.set()
            return third, refused_while_busy, health, other_model, progress, await first, await second

    third, refused_while_busy, health, other_model, progress, first, second = run(go())
    assert third.status_code == 503 and refused_while_busy  # at once, not after waiting
    assert int(third.headers["retry-after"]) >= 1
    assert "busy" in third.json()["detail"] and "--max-queue is 1" in third.json()["detail"]
    assert health.status_code == 200
    assert health.json()["models"][IMG]["queued"] == 1
    assert health.json()["models"][IMG]["running"] is True
    assert other_model.status_code == 200  # one model's queue does not block another model
    assert progress.json()["state"] == "running"
    assert first.status_code == 200 and second.status_code == 200  # the queued work still completes
    assert state.workers[IMG].stats()["worker_alive"]


def test_timeout_answers_504_and_stops_the_job(serve, monkeypatch):
    app, client = serve(ServeLimits(request_timeout_s=0.3))
    state = app.state.ditkit
    model = state.models[IMG]
    real = model.pipeline
    steps_taken = []

    def endless(progress=None, **kwargs):  # a sampler that would run for 20 s
        for _ in range(2000):
            progress(1)  # raises once the request is cancelled
            steps_taken.append(1)
            time.sleep(0.01)
        return real(**kwargs)

    monkeypatch.setattr(model, "pipeline", _Patched(real, endless))

    async def go():
        async with client() as c:
            slow = await c.post("/v1/images", json={"model": IMG, "request_id": "slow"})
            deadline = time.monotonic() + 5
            while state.workers[IMG].stats()["running"] and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            monkeypatch.setattr(model, "pipeline", real)
            after = await c.post("/v1/images", json={"model": IMG, "steps": 2})
            return slow, after, await c.get("/v1/progress/slow")

    slow, after, progress = run(go())
    assert slow.status_code == 504 and "timeout of 0.3 s (request_timeout_s)" in slow.json()["detail"]
    assert not state.workers[IMG].stats()["running"]
    assert len(steps_taken) < 200  # stopped within a step or so of the timeout, not after 2000
    assert progress.json()["state"] == "cancelled"
    assert after.status_code == 200  # the worker is free again


def test_a_failing_job_is_500_and_the_worker_survives(serve, monkeypatch):
    app, client = serve()
    state = app.state.ditkit
    model = state.models[IMG]
    real = model.pipeline
    calls = []

    def flaky(**kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory (simulated)")
        return real(**kwargs)

    monkeypatch.setattr(model, "pipeline", _Patched(real, flaky))

    async def go():
        async with client() as c:
            failed = await c.post("/v1/images", json={"model": IMG, "steps": 2})
            ok = await c.post("/v1/images", json={"model": IMG, "steps": 2})
            return failed, ok, await c.get("/health")

    failed, ok, health = run(go())
    assert failed.status_code == 500 and "out of memory (simulated)" in failed.json()["detail"]
    assert ok.status_code == 200
    stats = health.json()["models"][IMG]
    assert health.json()["status"] == "ok" and stats["worker_alive"] and stats["failed"] == 1 and stats["completed"] == 1


def test_progress_reports_done_and_unknown_ids(serve):
    app, client = serve()

    async def go():
        async with client() as c:
            await c.post("/v1/images", json={"model": IMG, "steps": 3, "num_images": 2, "request_id": "abc-1"})
            return await c.get("/v1/progress/abc-1"), await c.get("/v1/progress/never-sent")

    done, unknown = run(go())
    assert done.json() | {"elapsed_s": 0} == {
        "request_id": "abc-1", "model": IMG, "state": "done", "done": 3, "total": 3, "fraction": 1.0,
        "queue_position": 0, "elapsed_s": 0,
    }
    assert unknown.status_code == 404 and "never-sent" in unknown.json()["detail"]


# ---- pieces ----------------------------------------------------------------------------------------


def test_worker_queue_is_bounded_and_close_cancels_waiting_jobs():
    worker = ModelWorker("w", max_queue=2)
    gate = threading.Event()
    jobs = [Job(lambda step: gate.wait(10), total=1) for _ in range(3)]
    for job in jobs:
        worker.submit(job)
        deadline = time.monotonic() + 30
        while job is jobs[0] and worker.running is None:  # the first one is taken off the queue
            assert time.monotonic() < deadline, "the worker never took the first job"
            time.sleep(0.005)
    with pytest.raises(QueueFullError) as err:
        worker.submit(Job(lambda step: None, total=1))
    assert err.value.retry_after_s >= 1
    assert worker.position(jobs[2]) == 2
    worker.cancel(jobs[1])  # e.g. its request timed out while waiting: its slot frees at once
    assert worker.position(jobs[2]) == 1
    late = worker.submit(Job(lambda step: None, total=1))
    worker.close(timeout=0.1)
    gate.set()
    worker._thread.join(5)
    assert jobs[1].future.cancelled() and jobs[2].future.cancelled() and late.future.cancelled()
    assert jobs[0].future.result(timeout=1) is True  # the running job was allowed to finish its work
    assert not worker._thread.is_alive()


def test_pipeline_loads_once_and_matches_a_fresh_load(runs):
    pipe = ditkit.load(runs[IMG], device="cpu")
    a = pipe(class_labels=[1, 3], num_inference_steps=2, seed=11)
    b = pipe(class_labels=[1, 3], num_inference_steps=2, seed=11)
    ref = ditkit.load(runs[IMG], device="cpu")(class_labels=[1, 3], num_inference_steps=2, seed=11)
    assert a.tensors.shape == (2, 3, 16, 16)
    assert np.array_equal(a.tensors.numpy(), ref.tensors.numpy()) and np.array_equal(a.tensors.numpy(), b.tensors.numpy())
    assert a.metadata == ref.metadata and a.labels == [1, 3] and a.seeds == [11, 12]


def test_cli_serve_checks_before_serving(runs, tmp_path, capsys):
    assert cli_main(["serve", "--ckpt", str(tmp_path / "missing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert cli_main(["serve", "--ckpt", str(runs[IMG]), "--max-queue", "0"]) == 2
    assert "--max-queue 0: must be at least 1" in capsys.readouterr().err
    assert cli_main(["serve", "--ckpt", f"a={runs[IMG]}", "--ckpt", f"a={runs[UNCOND]}"]) == 2
    assert "served as 'a'" in capsys.readouterr().err


def test_ckpt_names():
    assert parse_ckpt_arg("demo=runs/000-x") == ("demo", "runs/000-x")
    assert parse_ckpt_arg("runs/000-x") == (None, "runs/000-x")
    with pytest.raises(ConfigError, match="model name may use"):
        parse_ckpt_arg("bad name=runs/x")


def test_blocklist_answers_422_naming_the_rule_and_is_on_by_default(serve):
    from ditkit.safety import Blocklist

    app, client = serve(blocklist=Blocklist.from_text("sums-off: 3+4\nanything: re:.\n"))

    async def go():
        async with client() as c:
            prompt = await c.post("/v1/text", json={"model": TXT, "prompt": "3+4=", "steps": 2})
            generated = await c.post("/v1/text", json={"model": TXT, "steps": 2, "length": 4})
            return prompt, generated

    prompt, generated = run(go())
    assert prompt.status_code == 422 and "refused by the safety rule 'sums-off'" in prompt.json()["detail"]
    assert "3+4" not in prompt.json()["detail"]  # the rule's name, never the matched text
    assert generated.status_code == 422 and "generated text refused by the safety rule 'anything'" in generated.json()["detail"]
    default_app, _ = serve()
    assert len(default_app.state.ditkit.blocklist) == 0  # on, with an empty list
