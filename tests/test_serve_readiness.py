"""The API's readiness report, its bounded generation queue and the scrubbing of host paths from errors."""

from __future__ import annotations

import asyncio

import pytest

from ragline.serve.readiness import GenerationQueue, Readiness, Unavailable, without_host_paths


def test_requests_for_a_loading_or_failed_component_are_turned_away_with_retry_after():
    ready = Readiness(["store", "llm"], retry_after_s=4)
    assert ready.report()["status"] == "loading"
    with pytest.raises(Unavailable) as loading:
        ready.require("store")
    assert (loading.value.code, loading.value.retry_after_s) == ("loading", 4)

    assert ready.load("store", lambda: "3 chunks")
    assert not ready.load("llm", lambda: (_ for _ in ()).throw(OSError("no room in /srv/models/x.gguf")))
    assert ready.report() == {
        "status": "failed",
        "components": {"store": {"status": "ready", "reason": "3 chunks"}, "llm": {"status": "failed", "reason": "no room in x.gguf"}},
    }
    with pytest.raises(Unavailable, match="the llm failed to load: no room in x.gguf"):
        ready.require("store", "llm")

    ready.degrade("llm", "answers are extracted")
    ready.require("store", "llm")
    assert ready.report()["status"] == "degraded"


def test_the_queue_admits_its_bound_and_gives_places_back():
    async def scenario() -> None:
        queue = GenerationQueue(concurrent=1, queued=1, retry_after_s=9)
        first, second = queue.admit(), queue.admit()
        with pytest.raises(Unavailable) as busy:
            queue.admit()
        assert (busy.value.code, busy.value.retry_after_s) == ("busy", 9)

        async with first:
            assert second.must_wait
            waiting = asyncio.ensure_future(second.__aenter__())
            await asyncio.sleep(0)
            assert not waiting.done()
        await asyncio.wait_for(waiting, 10)  # the turn passed on when the first finished
        second.release()
        second.release()  # idempotent
        assert queue.admitted == 0 and queue.served == 2

        never_started = queue.admit()
        never_started.release()  # a client that left before its turn
        assert queue.admitted == 0
        async with queue.admit():
            pass

    asyncio.run(scenario())


def test_host_paths_are_cut_to_their_last_part_and_urls_are_kept():
    message = "cannot open /home/ann/.ragline/index/chunks.sqlite; LLM at http://127.0.0.1:8000/v1 said no"
    assert without_host_paths(message) == "cannot open chunks.sqlite; LLM at http://127.0.0.1:8000/v1 said no"
    assert without_host_paths("see ~/models/a.gguf (missing)") == "see a.gguf (missing)"
