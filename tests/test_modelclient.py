"""The one model client against a real HTTP server on loopback: a deadline over all tries, Retry-After,
one connection pool for sync and async callers, and no retry of a refusal."""

from __future__ import annotations

import asyncio
import threading

import anyio
import pytest
from scripted_llm_server import Reply, ScriptedLLMServer, completion, free_port

from ragline.modelclient import CallPolicy, DeadlineExceeded, GaveUp, ModelClient, Rejected, deadline

FAST = CallPolicy(tries=4, backoff_initial_s=0.05, backoff_max_s=5.0, read_timeout_s=5.0)


@pytest.fixture(scope="module")
def server():
    with ScriptedLLMServer() as running:
        yield running


@pytest.fixture
def client():
    made = ModelClient()
    yield made
    made.close()


def url(server: ScriptedLLMServer) -> str:
    return server.url + "/chat/completions"


def test_a_2xx_comes_back_read(server, client):
    server.script(Reply(200, completion("hi")))
    response = client.post(url(server), {"q": 1}, headers={"Authorization": "Bearer k"}, policy=FAST)
    assert response.json()["choices"][0]["message"]["content"] == "hi"
    (request,) = server.received
    assert request.body == {"q": 1} and request.headers["Authorization"] == "Bearer k"


def test_the_deadline_covers_every_try_and_wait(server, client):
    """Each try alone is within its read timeout (5 s); together they are not within the call's 1 s."""
    server.script(*[Reply(503, {"error": "busy"}, delay_s=0.3)] * 20)
    policy = CallPolicy(tries=20, backoff_initial_s=0.05, read_timeout_s=5.0, deadline_s=1.0)
    with pytest.raises(DeadlineExceeded) as error:
        client.post(url(server), {}, policy=policy)
    # without a deadline over the whole call, all 20 tries (6 s of replies) would have been made
    assert 1 <= error.value.tries < 20 and len(server.received) == error.value.tries


def test_a_stalled_server_is_left_at_the_deadline_not_the_read_timeout(server, client):
    server.script(Reply(200, completion("late"), delay_s=3.0), Reply(200, completion("late"), delay_s=3.0))
    policy = CallPolicy(tries=3, read_timeout_s=30.0, deadline_s=0.5)
    with pytest.raises(DeadlineExceeded, match="ReadTimeout|deadline"):
        client.post(url(server), {}, policy=policy)
    assert len(server.received) == 1


def test_a_request_deadline_tightens_calls_in_worker_threads(server, client):
    """`deadline` is a context variable: anyio's worker threads inherit it, as the API's handlers' do."""
    server.script(Reply(200, completion("late"), delay_s=3.0))

    async def handler() -> None:
        with deadline(0.4):
            await anyio.to_thread.run_sync(lambda: client.post(url(server), {}, policy=FAST))

    with pytest.raises(DeadlineExceeded):
        anyio.run(handler)


def test_retry_after_is_honoured(server, client):
    server.script(Reply(429, {"error": "slow down"}, headers={"Retry-After": "1"}), Reply(200, completion("ok")))
    assert client.post(url(server), {}, policy=FAST).status_code == 200
    first, second = server.received
    assert second.at - first.at >= 1.0  # the backoff alone would wait 0.05-0.1 s


def test_a_retry_after_beyond_the_deadline_ends_the_call_at_once(server, client):
    server.script(Reply(503, {"error": "down"}, headers={"Retry-After": "30"}), Reply(200, completion("ok")))
    with pytest.raises(DeadlineExceeded) as error:
        client.post(url(server), {}, policy=CallPolicy(tries=4, backoff_max_s=60, deadline_s=5.0))
    assert error.value.tries == 1 and len(server.received) == 1


def test_a_refusal_is_not_retried(server, client):
    server.script(Reply(400, {"error": {"message": "bad input"}}), Reply(200, completion("no")))
    with pytest.raises(Rejected, match="HTTP 400 Bad Request: bad input") as error:
        client.post(url(server), {}, policy=FAST)
    assert error.value.status_code == 400 and len(server.received) == 1


def test_transient_failures_are_retried_until_the_last_try(server, client):
    server.script(*[Reply(502, "bad gateway")] * 4)
    with pytest.raises(GaveUp) as error:
        client.post(url(server), {}, policy=FAST)
    assert error.value.tries == 4 and len(server.received) == 4


def test_one_pool_serves_sync_and_async_callers(server, client):
    """Sequential calls, from this thread, other threads and another event loop, reuse one connection."""
    server.script()
    fallback = [Reply(200, completion("ok"))] * 12
    server.script(*fallback)
    for _ in range(4):
        client.post(url(server), {}, policy=FAST)
    for _ in range(4):
        worker = threading.Thread(target=client.post, args=(url(server), {}), kwargs={"policy": FAST})
        worker.start()
        worker.join()

    async def from_another_loop() -> None:
        for _ in range(4):
            await client.apost(url(server), {}, policy=FAST)

    asyncio.run(from_another_loop())
    assert len(server.received) == 12
    assert client.connections_opened == 1
    assert len({request.peer for request in server.received}) == 1


def test_concurrent_calls_open_connections_only_as_needed(server, client):
    server.script(*[Reply(200, completion("ok"), delay_s=0.2)] * 8)

    async def burst() -> None:
        await asyncio.gather(*(client.apost(url(server), {}, policy=FAST) for _ in range(4)))
        await asyncio.gather(*(client.apost(url(server), {}, policy=FAST) for _ in range(4)))

    asyncio.run(burst())
    assert len(server.received) == 8
    assert client.connections_opened == len({request.peer for request in server.received}) <= 4


def test_a_cancelled_async_caller_cancels_its_call(server, client):
    server.script(Reply(200, completion("late"), delay_s=2.0), Reply(200, completion("next")))

    async def impatient() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.apost(url(server), {}, policy=FAST), 0.2)

    asyncio.run(impatient())
    assert client.post(url(server), {}, policy=FAST).json()["choices"][0]["message"]["content"] == "next"


def test_an_unreachable_server_is_described_as_the_os_says(client):
    with pytest.raises(GaveUp, match=r"ConnectError: \[Errno 111\] Connection refused"):
        client.post(f"http://127.0.0.1:{free_port()}/x", {}, policy=CallPolicy(tries=2, backoff_initial_s=0.01))


def test_streams_open_through_the_same_tries(server, client):
    from scripted_llm_server import Stream

    server.script(Reply(503, "busy"), Stream(["a", "b"]))
    stream = client.stream(url(server), {"stream": True}, policy=FAST)
    try:
        lines = [line for line in stream.iter_lines() if line.startswith("data:")]
    finally:
        stream.close()
    assert len(server.received) == 2 and lines[-1] == "data: [DONE]"
