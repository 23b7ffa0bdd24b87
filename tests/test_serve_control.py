"""``POST /v1/images`` with an uploaded picture: inpainting keeps the upload's known region, image-
to-image follows ``strength``, every kind of bad upload answers 422 naming its field, a pipeline
``ConfigError`` becomes a 422 worded with the request's fields, and the page has the controls.
(The page's mask drawing itself is not run in a browser here.)"""

import base64
import io

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from ditkit.config import ConfigError  # noqa: E402
from ditkit.serve.app import create_app  # noqa: E402
from ditkit.serve.launch import load_models  # noqa: E402
from ditkit.serve.limits import ServeLimits  # noqa: E402
from pathlib import Path  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "outputs"
SIZE = 16  # the fixture image checkpoint draws 16x16 RGB, 4 classes, gaussian, 4 steps


def b64png(image: Image.Image, data_url: bool = False) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    text = base64.b64encode(buffer.getvalue()).decode("ascii")
    return "data:image/png;base64," + text if data_url else text


def upload(seed: int = 0, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def pixels(item) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["png_base64"]))).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def models():
    return load_models([f"img={FIXTURES / 'image_ckpt'}", f"txt={FIXTURES / 'text_ckpt'}"], device="cpu")


@pytest.fixture
def client(models):
    apps = []

    def make(limits=None):
        app = create_app(models, limits or ServeLimits(max_queue=4, request_timeout_s=60, max_body_bytes=64 * 1024))
        apps.append(app)
        return TestClient(app)

    yield make
    for app in apps:
        app.state.ditkit.close()


def base(**extra):
    return {"model": "img", "class_labels": [1], "num_images": 2, "steps": 4, "cfg_scale": 1.0, "seed": 3, **extra}


def test_inpainting_keeps_the_uploaded_known_region(client):
    image = upload(0)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, SIZE // 2:] = 255  # regenerate the right half
    r = client().post("/v1/images", json=base(image=b64png(Image.fromarray(image), data_url=True),
                                              mask_image=b64png(Image.fromarray(mask))))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["metadata"]["control"] == "inpainting"
    keep = mask == 0
    for item in body["images"]:
        out = pixels(item)
        # known region: the upload after the PNG round trip (u/127.5 - 1 -> round((x + 1) 127.5) = u)
        assert np.abs(out[keep] - image[keep]).max() <= 1
        assert np.abs(out[~keep] - image[~keep]).mean() > 20  # the masked half was regenerated
    a, b = (pixels(item) for item in body["images"])
    assert np.abs(a[~keep] - b[~keep]).mean() > 1  # seeds 3 and 4: two different fills


def test_image_to_image_follows_strength_and_plain_generation_still_works(client):
    c = client()
    image = upload(1)
    far, near = [
        c.post("/v1/images", json=base(image=b64png(Image.fromarray(image)), strength=s, steps=20)).json()
        for s in (1.0, 0.1)
    ]
    assert near["metadata"]["control"] == "image-to-image, strength 0.1"
    dist = {name: np.mean([np.abs(pixels(i) - image).mean() for i in r["images"]]) for name, r in (("far", far), ("near", near))}
    assert dist["near"] < dist["far"] / 2, dist  # a small strength keeps the picture, strength 1 redraws it
    plain = c.post("/v1/images", json=base())
    assert plain.status_code == 200 and "control" not in plain.json()["metadata"]


def _png_bytes(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


GOOD = b64png(Image.fromarray(upload(2)))
MASK = b64png(Image.fromarray(np.kron([[0, 255]], np.ones((SIZE, SIZE // 2))).astype(np.uint8)))  # right half white


@pytest.mark.parametrize("extra, message", [
    ({"image": "not base64 !!"}, "image: not valid base64"),
    ({"image": "data:image/png,abc"}, "image: a data: URL must be base64-encoded"),
    ({"image": base64.b64encode(b"hello, not a picture").decode()}, "image: not an image"),
    ({"image": b64png(Image.fromarray(upload(2, 20)))}, "image: the image is 20x20, the model draws 16x16"),
    ({"image": _png_bytes(Image.new("I;16", (SIZE, SIZE)))}, "image: mode I;16 is not taken"),
    ({"image": _png_bytes(Image.new("RGB", (SIZE, SIZE)), "BMP")}, "image: BMP files are not taken"),
    ({"image": GOOD[: len(GOOD) // 2 // 4 * 4]}, "image: the PNG data is corrupt or truncated"),
    ({"mask_image": MASK}, "mask_image edits an uploaded picture: send image too"),
    ({"strength": 0.5}, "strength edits an uploaded picture: send image too"),
    ({"image": GOOD, "strength": 0.0}, "strength=0.0 is outside (0, 1]"),
    ({"image": GOOD, "strength": 1.5}, "strength=1.5 is outside (0, 1]"),
    ({"image": GOOD, "mask_image": b64png(Image.new("L", (8, 8), 255))}, "mask_image: the image is 8x8"),
    ({"image": GOOD, "mask_image": "%%%"}, "mask_image: not valid base64"),
    ({"image": GOOD, "mask_image": b64png(Image.new("L", (SIZE, SIZE), 100))}, "mask_image is all black"),
    ({"image": GOOD, "mask_image": b64png(Image.new("RGB", (SIZE, SIZE), "white"))}, "mask_image is all white"),
    ({"image": 7}, "image: Input should be a valid string"),
])
def test_bad_uploads_answer_422_naming_the_field(client, extra, message):
    r = client().post("/v1/images", json=base(**extra))
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]
    assert "\n" not in r.json()["detail"]


def test_text_models_refuse_images_and_bodies_over_the_limit_are_413(client):
    r = client().post("/v1/text", json={"model": "txt", "prompt": "1+", "image": GOOD})
    assert r.status_code == 422 and "image: unknown field" in r.json()["detail"]
    big = b64png(Image.fromarray(upload(5)))
    r = client(ServeLimits(max_body_bytes=len(big) // 2)).post("/v1/images", json=base(image=big))
    assert r.status_code == 413 and "max_body_bytes" in r.json()["detail"]


class Wrapped:
    """The real pipeline for every attribute, ``call`` in place of its ``__call__``."""

    def __init__(self, real, call):
        self.real, self.call = real, call

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __call__(self, *args, **kwargs):
        return self.call(*args, **kwargs)


def test_a_pipeline_config_error_is_a_422_in_the_requests_words(client, models, monkeypatch):
    model = next(m for m in models if m.name == "img")

    def refuse(**kwargs):
        assert kwargs["strict"] is True and kwargs["image"].size == (SIZE, SIZE) and kwargs["image"].mode == "RGB"
        raise ConfigError("--init-image/--mask: give one image (and mask) or one per sample (2)")

    monkeypatch.setattr(model, "pipeline", Wrapped(model.pipeline, refuse))
    r = client().post("/v1/images", json=base(image=GOOD, mask_image=MASK))
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == "image/mask_image: give one image (and mask) or one per sample (2)"


def test_models_say_which_take_an_image_and_the_page_has_the_controls(client):
    c = client()
    described = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
    assert described["img"]["takes_image"] is True
    html = c.get("/").text
    for control in ('id="init-image"', 'type="file"', 'id="mask-canvas"', 'id="mask-file"', 'id="brush-size"',
                    'id="clear-mask"', 'id="strength"', 'id="use-strength"', 'id="image-preview"'):
        assert control in html, control
    script = c.get("/static/app.js").text
    for piece in ("body.image", "body.mask_image", "body.strength", "pointerdown", "toDataURL"):
        assert piece in script, piece


# ---- the page in headless Chromium (slow; skipped without Playwright and /usr/bin/chromium) ----------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_page_uploads_paints_a_mask_and_inpaints_in_chromium(models, tmp_path):
    import json
    import os
    import socket
    import threading
    import time

    sync_api = pytest.importorskip("playwright.sync_api")
    uvicorn = pytest.importorskip("uvicorn")
    chromium = os.environ.get("DITKIT_CHROMIUM", "/usr/bin/chromium")
    if not os.access(chromium, os.X_OK):
        pytest.skip(f"no Chromium at {chromium}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(models, ServeLimits(max_queue=4, request_timeout_s=60))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    photo = tmp_path / "photo.png"
    Image.fromarray(upload(9, 48)[:, :40]).save(photo)  # 40 wide, 48 tall: cropped to a square, resized to 16
    sent, replies = [], []
    try:
        while not server.started:
            time.sleep(0.05)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 900})
                errors = []
                page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
                page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/v1/images") else None)
                page.on("response", lambda r: replies.append(r.json()) if r.url.endswith("/v1/images") else None)
                page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
                page.locator("#class option").nth(4).wait_for(state="attached", timeout=15000)
                assert page.is_visible("#init-image") and page.is_hidden("#image-editor")
                page.set_input_files("#init-image", str(photo))
                page.wait_for_selector("#image-editor", state="visible", timeout=10000)
                box = page.locator("#mask-canvas").bounding_box()
                page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + 2)
                page.mouse.down()  # paint a stripe down the right part
                page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] - 2, steps=12)
                page.mouse.up()
                page.uncheck("#use-strength")
                page.fill("#num-images", "1")
                page.click("#generate")
                page.wait_for_selector("#gallery img.sample", timeout=60000)
                settings = page.inner_text("#gallery .card .settings")
                assert "from your image: inpainting" in settings, settings
                assert not errors, errors
            finally:
                browser.close()
    finally:
        server.should_exit = True
        thread.join(10)
        app.state.ditkit.close()
    (body,), (reply,) = sent, replies
    assert "strength" not in body and body["image"].startswith("data:image/png;base64,")
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["image"].split(",", 1)[1]))).convert("RGB"), np.int16)
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask_image"].split(",", 1)[1]))).convert("L"))
    assert image.shape == (SIZE, SIZE, 3) and mask.shape == (SIZE, SIZE)
    assert set(np.unique(mask)) == {0, 255} and 0 < (mask == 255).mean() < 0.5  # a crisp painted stripe
    out = pixels(reply["images"][0])
    keep = mask == 0
    assert np.abs(out[keep] - image[keep]).max() <= 1
