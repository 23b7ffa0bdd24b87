"""Fixtures shared by several test files."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def digits_split(tmp_path_factory):
    """sklearn's digits in [-1, 1], split 1437 train / 360 held out with a fixed seed, and one eval
    cache directory shared by the eval test files: (train_x, train_y, test_x, test_y, cache)."""
    datasets = pytest.importorskip("sklearn.datasets")
    data = datasets.load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16 * 2 - 1  # (1797, 1, 8, 8)
    labels = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    test, train = order[:360], order[360:]
    cache = tmp_path_factory.getbasetemp() / "ditkit-eval-cache"
    return images[train], labels[train], images[test], labels[test], cache


@pytest.fixture
def serve_session():
    """``serve_session(["name=RUN", ...], talk, limits=None)``: the server of those runs (ASGI, no
    socket) for one conversation: returns what ``await talk(client)`` returns, ``client`` an
    ``httpx.AsyncClient`` on the app; the app's workers are stopped after."""
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    import asyncio

    from ditkit.serve.app import create_app
    from ditkit.serve.launch import load_models
    from ditkit.serve.models import ServeLimits

    def session(specs, talk, limits=None):
        app = create_app(load_models(specs, device="cpu"), limits or ServeLimits(max_queue=2, request_timeout_s=60))

        async def conversation():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
                return await talk(client)

        try:
            return asyncio.run(conversation())
        finally:
            app.state.ditkit.close()

    return session


# ---- CI: no silent skips ---------------------------------------------------------------------------
# .ci/run installs every optional package the tests use (diffusers, tokenizers, tensorboard, scipy,
# the browser, ...) and sets DITKIT_STRICT_SKIPS=1: there, a skipped test means a missing install
# and fails the run, naming the test and its reason. Locally a missing optional package skips.

_skipped: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append(f"{report.nodeid}: {reason}")


def pytest_collectreport(report):
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    import os

    if os.environ.get("DITKIT_STRICT_SKIPS") == "1" and _skipped and exitstatus == 0:
        print("\nDITKIT_STRICT_SKIPS=1: these tests were skipped, so something .ci/run should install is missing:")
        for line in _skipped:
            print(f"  {line}")
        session.exitstatus = 1
