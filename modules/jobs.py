"""The job queue and its worker: one worker per device, fair between users.

Jobs are taken round robin across users (FIFO within one user), so a user who queues fifty
images does not block a colleague's single one. Each job carries its own control flags and
progress: interrupting or reading progress only ever touches the caller's job. A job that raises
fails alone; the worker goes on with the next.
"""
from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from modules.devices import is_oom
from modules.job_state import GenerationResult, JobControl, Progress
from modules.request import GenerationRequest

log = logging.getLogger("athanor.jobs")

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)


class QueueFullError(RuntimeError):
    pass


class JobNotFound(KeyError):
    pass


@dataclass
class Job:
    request: GenerationRequest
    owner: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    status: str = QUEUED
    error: str | None = None
    error_kind: str | None = None  # "input" (bad request), "extension", "oom" or "internal"
    result: GenerationResult | None = None
    control: JobControl = field(default_factory=JobControl)
    progress: Progress = field(default_factory=Progress)
    done: threading.Event = field(default_factory=threading.Event)
    seq: int = 0
    plan: Any = None  # modules.plan.GenerationPlan, made by the request gate at submission

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)


Runner = Callable[[Job], GenerationResult]


def error_kind(exc: BaseException) -> str:
    """Sort a job failure: the user's input, an extension, out of memory, or our own bug."""
    from modules.hooks import ExtensionError

    if isinstance(exc, ExtensionError):
        return "extension"
    if is_oom(exc):
        return "oom"
    if isinstance(exc, ValueError):
        return "input"
    return "internal"


class JobQueue:
    def __init__(self, runner: Runner, *, max_queued_per_user: int = 100, keep_finished: int = 200):
        self._runner = runner
        self._max_per_user = max_queued_per_user
        self._keep_finished = keep_finished
        self._lock = threading.Condition()
        self._pending: dict[str, collections.deque[Job]] = {}
        self._users: collections.deque[str] = collections.deque()  # round-robin order
        self._jobs: dict[str, Job] = {}
        self._finished_order: collections.deque[str] = collections.deque()
        self._running: Job | None = None
        self._last_served: str | None = None
        self._stopping = False
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    # -- submission and lookup --------------------------------------------------------------
    def submit(self, request: GenerationRequest, owner: str = "local", *, plan: Any = None) -> Job:
        """Queue `request` for `owner`; `plan` is its GenerationPlan when the request gate made one."""
        with self._lock:
            if self._stopping:
                raise QueueFullError("The server is shutting down and accepts no new jobs")
            queue = self._pending.setdefault(owner, collections.deque())
            if len(queue) >= self._max_per_user:
                raise QueueFullError(f"You already have {len(queue)} jobs waiting (limit {self._max_per_user})")
            job = Job(request=request, owner=owner, seq=next(self._seq), plan=plan)
            queue.append(job)
            if owner not in self._users:
                # A newcomer goes before the user served last (who sits at the end after being served),
                # so someone who was alone in the queue does not get a second turn first.
                if self._users and self._users[-1] == self._last_served:
                    self._users.insert(len(self._users) - 1, owner)
                else:
                    self._users.append(owner)
            self._jobs[job.id] = job
            self._lock.notify_all()
            return job

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    def all_jobs(self) -> list[Job]:
        """Every job still known (queued, running, or among the recently finished), oldest first."""
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.seq)

    def jobs_of(self, owner: str) -> list[Job]:
        with self._lock:
            return [j for j in self._jobs.values() if j.owner == owner]

    def running(self) -> Job | None:
        return self._running

    def order(self) -> list[Job]:
        """The pending jobs in the order the worker will take them."""
        with self._lock:
            queues = {u: list(q) for u, q in self._pending.items()}
            users = list(self._users)
        out: list[Job] = []
        while any(queues.values()):
            for user in list(users):
                if queues.get(user):
                    out.append(queues[user].pop(0))
        return out

    def position(self, job: Job) -> int:
        """0 = running or finished; n = n-th in line."""
        if job.status != QUEUED:
            return 0
        for index, other in enumerate(self.order(), start=1):
            if other is job:
                return index
        return 0

    # -- control --------------------------------------------------------------------------
    def cancel(self, job: Job) -> None:
        """Cancel a queued job, or interrupt it when it is running."""
        with self._lock:
            if job.status == QUEUED:
                self._pending[job.owner].remove(job)
                self._finish(job, CANCELLED, None)
                return
        if job.status == RUNNING:
            job.control.interrupt()

    def interrupt_user(self, owner: str) -> bool:
        running = self._running
        if running is not None and running.owner == owner:
            running.control.interrupt()
            return True
        return False

    # -- worker ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="athanor-worker", daemon=True)
            self._thread.start()

    def _next(self) -> Job | None:
        with self._lock:
            while not self._stopping:
                for _ in range(len(self._users)):
                    user = self._users[0]
                    self._users.rotate(-1)
                    queue = self._pending.get(user)
                    if queue:
                        job = queue.popleft()
                        self._last_served = user
                        job.status = RUNNING
                        job.started = time.time()
                        job.progress.started = job.started
                        self._running = job
                        return job
                self._users = collections.deque(u for u in self._users if self._pending.get(u))
                self._lock.wait()
            return None

    def _work(self) -> None:
        while True:
            job = self._next()
            if job is None:
                return
            try:
                result = self._runner(job)
            except Exception as exc:  # noqa: BLE001 - a failing job fails alone
                message = str(exc) or type(exc).__name__
                kind = error_kind(exc)
                if kind == "oom":
                    message = f"Out of memory: {message}. Try a smaller size or batch."
                log.error("Job %s failed: %s\n%s", job.id, message, traceback.format_exc())
                self._finish(job, FAILED, None, message, kind)
            else:
                self._finish(job, DONE, result)

    def _finish(self, job: Job, status: str, result: GenerationResult | None, error: str | None = None,
                kind: str | None = None) -> None:
        with self._lock:
            job.status = status
            job.result = result
            job.error = error
            job.error_kind = kind
            job.finished = time.time()
            if self._running is job:
                self._running = None
            self._finished_order.append(job.id)
            while len(self._finished_order) > self._keep_finished:
                old = self._finished_order.popleft()
                self._jobs.pop(old, None)
            job.done.set()
            self._lock.notify_all()

    def shutdown(self, *, wait: float = 30.0) -> dict[str, list[str]]:
        """Stop taking jobs: cancel the queued ones, let the running one finish (interrupt it after `wait`)."""
        with self._lock:
            self._stopping = True
            cancelled = []
            for queue in self._pending.values():
                while queue:
                    job = queue.popleft()
                    self._finish(job, CANCELLED, None, "cancelled: server shutting down")
                    cancelled.append(job.id)
            running = self._running
            self._lock.notify_all()
        finished = []
        if running is not None:
            if not running.wait(wait):
                running.control.interrupt()
                running.wait(wait)
            finished.append(running.id)
        if self._thread is not None:
            self._thread.join(timeout=wait)
        return {"cancelled": cancelled, "finished": finished}
