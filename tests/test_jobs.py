"""The job queue alone: fairness between users, failures that stay with their job, shutdown."""
from __future__ import annotations

import threading

from modules.jobs import CANCELLED, DONE, FAILED, JobQueue
from modules.request import GenerationRequest


def make_queue(fail_on: str | None = None):
    gate = threading.Event()
    served = []

    def runner(job):
        gate.wait(10)
        served.append(job.request.prompt)
        if job.request.prompt == fail_on:
            raise ValueError("bad prompt for this test")
        if job.request.prompt == "crash":
            raise RuntimeError("boom")
        return "result"

    return JobQueue(runner), gate, served


def test_round_robin_between_users_fifo_within_one():
    queue, gate, served = make_queue()
    jobs = [queue.submit(GenerationRequest(prompt=f"a{i}"), "alice") for i in range(3)]
    queue.start()
    while queue.running() is None:
        pass  # alice's first job is taken while she is alone
    jobs += [queue.submit(GenerationRequest(prompt=f"b{i}"), "bob") for i in range(2)]
    jobs += [queue.submit(GenerationRequest(prompt="c0"), "carol")]
    assert [j.request.prompt for j in queue.order()] == ["b0", "c0", "a1", "b1", "a2"]
    assert queue.position(jobs[3]) == 1 and queue.position(jobs[2]) == 5
    gate.set()
    for job in jobs:
        assert job.wait(10) and job.status == DONE
    assert served == ["a0", "b0", "c0", "a1", "b1", "a2"]
    queue.shutdown()


def test_a_failing_job_fails_alone_with_its_kind():
    queue, gate, served = make_queue(fail_on="bad")
    gate.set()
    queue.start()
    bad = queue.submit(GenerationRequest(prompt="bad"), "u")
    crash = queue.submit(GenerationRequest(prompt="crash"), "u")
    good = queue.submit(GenerationRequest(prompt="good"), "u")
    for job in (bad, crash, good):
        assert job.wait(10)
    assert (bad.status, bad.error_kind, bad.error) == (FAILED, "input", "bad prompt for this test")
    assert (crash.status, crash.error_kind) == (FAILED, "internal")
    assert good.status == DONE
    queue.shutdown()


def test_cancel_queued_and_shutdown_reports_what_it_did():
    queue, gate, served = make_queue()
    queue.start()
    first = queue.submit(GenerationRequest(prompt="first"), "u")
    while queue.running() is None:
        pass
    second = queue.submit(GenerationRequest(prompt="second"), "u")
    third = queue.submit(GenerationRequest(prompt="third"), "v")
    queue.cancel(second)
    assert second.status == CANCELLED
    threading.Timer(0.2, gate.set).start()
    outcome = queue.shutdown(wait=10)
    assert outcome == {"cancelled": [third.id], "finished": [first.id]}
    assert first.status == DONE and third.status == CANCELLED
    assert served == ["first"]
