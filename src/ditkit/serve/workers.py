"""One worker thread per served model, fed by a bounded queue.

Generation is slow, holds a model that is not safe to share between threads, and must never run on
the server's event loop (the loop has to keep answering ``/health``, the page and the queue-full
503s). So each model gets one ``ModelWorker``: a daemon thread that runs jobs one at a time, in
arrival order, under ``torch.inference_mode()``. ``submit`` never blocks: when ``max_queue`` jobs
are already waiting it raises ``QueueFullError`` at once (the HTTP layer answers 503 with
Retry-After). A job that fails sets its exception on its future; the thread itself never dies.

A job reports progress by calling ``step(k)`` (k sampler steps done); the same call raises
``JobCancelled`` once the job has been cancelled (request timeout, server shutdown), so a running
job stops within one sampler step instead of finishing work nobody will read.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

__all__ = ["QueueFullError", "JobCancelled", "Job", "ModelWorker", "ProgressBoard"]


class QueueFullError(RuntimeError):
    """The model's queue is full; ``retry_after_s`` estimates when a slot frees up."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class JobCancelled(RuntimeError):
    """Raised inside a job (from ``step``) after the job was cancelled."""


@dataclass
class Job:
    """One request's work. ``run(job)`` executes on the worker thread and calls ``job(k)`` after
    ``k`` units of work; ``total`` (the units of a full run, for the progress fraction) is what the
    pipeline announces through ``job.set_total`` when it starts (``ditkit.progress.announce_total``),
    0 until then."""

    run: Callable[[Callable[[int], None]], Any]
    total: int = 0
    request_id: Optional[str] = None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    state: str = "queued"  # queued -> running -> done | failed | cancelled
    done: int = 0
    submitted_at: float = field(default_factory=time.monotonic)
    started_at: Optional[float] = None
    _cancel: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop the job: dropped if still queued, aborted at its next step if running."""
        self._cancel.set()
        if self.future.cancel():  # still pending: it never runs
            self.state = "cancelled"

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def step(self, k: int = 1) -> None:
        """Called by the job's code after ``k`` units of work; raises ``JobCancelled`` if cancelled."""
        if self._cancel.is_set():
            raise JobCancelled("the request was cancelled (timed out or the server is stopping)")
        self.done += k

    __call__ = step  # the job is the pipeline's ``progress`` callback

    def set_total(self, total: int) -> None:
        """The units of work the run will report (announced by the pipeline before it starts)."""
        self.total = int(total)


class ModelWorker:
    """A thread that runs one model's jobs in order, with at most ``max_queue`` waiting."""

    def __init__(self, name: str, max_queue: int, initial_job_s: float = 5.0) -> None:
        if max_queue < 1:
            raise ValueError(f"--max-queue {max_queue}: must be at least 1")
        self.name = name
        self.max_queue = max_queue
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self.running: Optional[Job] = None
        self.completed = 0
        self.failed = 0
        self._mean_job_s = initial_job_s  # running mean of job durations, for Retry-After
        self._thread = threading.Thread(target=self._loop, name=f"ditkit-serve-{name}", daemon=True)
        self._thread.start()

    # ---- client side (event loop) ----

    def submit(self, job: Job) -> Job:
        """Queue ``job`` or raise ``QueueFullError`` immediately (never blocks)."""
        with self._cond:
            if self._closing:
                raise QueueFullError(f"model {self.name!r} is shutting down", retry_after_s=5)
            if len(self._pending) >= self.max_queue:
                raise QueueFullError(
                    f"model {self.name!r} is busy: {len(self._pending)} requests are already waiting "
                    f"(the server's --max-queue is {self.max_queue}); retry later",
                    retry_after_s=self.retry_after_s(),
                )
            self._pending.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Cancel ``job``: a waiting job leaves the queue at once (its slot is free for the next
        request); a running one stops at its next step."""
        with self._cond:
            try:
                self._pending.remove(job)
            except ValueError:
                pass
        job.cancel()

    def retry_after_s(self) -> int:
        """Seconds until the queue likely has room again (whole seconds, at least 1)."""
        return max(1, math.ceil(self._mean_job_s))

    def position(self, job: Job) -> int:
        """Jobs ahead of ``job`` (0: it runs next, or is running)."""
        with self._cond:
            try:
                return self._pending.index(job) + (self.running is not None)
            except ValueError:
                return 0

    def stats(self) -> dict[str, Any]:
        """Queue depth and counters, for ``/health`` and ``/v1/models``."""
        with self._cond:
            return {
                "queued": len(self._pending),
                "running": self.running is not None,
                "max_queue": self.max_queue,
                "completed": self.completed,
                "failed": self.failed,
                "worker_alive": self._thread.is_alive(),
            }

    def close(self, timeout: float = 5.0) -> None:
        """Cancel waiting jobs, ask the running one to stop, end the thread."""
        with self._cond:
            self._closing = True
            pending, self._pending = list(self._pending), collections.deque()
            if self.running is not None:
                self.running.cancel()
            self._cond.notify_all()
        for job in pending:
            job.cancel()
        self._thread.join(timeout)

    # ---- worker thread ----

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if self._closing and not self._pending:
                    return
                job = self._pending.popleft()
                if not job.future.set_running_or_notify_cancel():
                    job.state = "cancelled"  # cancelled while it waited
                    continue
                self.running = job
            self._run(job)

    def _run(self, job: Job) -> None:
        job.state, job.started_at = "running", time.monotonic()
        result: Any = None
        error: Optional[BaseException] = None
        try:
            if job.cancelled:
                raise JobCancelled("the request was cancelled before it started")
            with torch.inference_mode():
                result = job.run(job)
        except BaseException as err:  # noqa: BLE001 -- any failure belongs to this job, not the thread
            error = err
        # Book-keeping first, then wake the client: whoever reads the answer sees the worker free.
        with self._cond:
            self.running = None
            if isinstance(error, JobCancelled):
                job.state = "cancelled"
            elif error is not None:
                job.state = "failed"
                self.failed += 1
            else:
                job.state = "done"
                job.done = max(job.done, job.total)
                self.completed += 1
                self._mean_job_s = 0.7 * self._mean_job_s + 0.3 * (time.monotonic() - job.started_at)
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)


class ProgressBoard:
    """Recent jobs by client-chosen request id, so a page can poll a request's progress while its
    POST is in flight. Holds at most ``capacity`` ids (oldest forgotten first)."""

    def __init__(self, capacity: int = 512) -> None:
        self.capacity = capacity
        self._jobs: collections.OrderedDict[str, tuple[ModelWorker, Job]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def add(self, worker: ModelWorker, job: Job) -> None:
        if job.request_id is None:
            return
        with self._lock:
            self._jobs[job.request_id] = (worker, job)
            self._jobs.move_to_end(job.request_id)
            while len(self._jobs) > self.capacity:
                self._jobs.popitem(last=False)

    def get(self, request_id: str) -> Optional[dict[str, Any]]:
        """``{"state", "done", "total", "fraction", "queue_position", "elapsed_s"}`` or None."""
        with self._lock:
            entry = self._jobs.get(request_id)
        if entry is None:
            return None
        worker, job = entry
        total = max(job.total, 1)
        return {
            "request_id": request_id,
            "model": worker.name,
            "state": job.state,
            "done": min(job.done, total),
            "total": total,
            "fraction": min(job.done, total) / total,
            "queue_position": worker.position(job) if job.state == "queued" else 0,
            "elapsed_s": round(time.monotonic() - job.submitted_at, 3),
        }
