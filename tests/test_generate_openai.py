"""The OpenAI-compatible client against a real scripted HTTP server: retries, timeouts, streams."""

from __future__ import annotations

import asyncio
import time
from email.utils import formatdate

import pytest
from scripted_llm_server import Reply, ScriptedLLMServer, Stream, completion, free_port

from ragline.generate.base import LLM, LLMError
from ragline.generate.openai_compat import OpenAICompatLLM

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Which port?"}]
BACKOFF = 0.1


@pytest.fixture(scope="module")
def server():
    with ScriptedLLMServer() as running:
        yield running


def client(url: str, **overrides) -> OpenAICompatLLM:
    options = {"backoff_initial_s": BACKOFF, "read_timeout_s": 2.0, "max_tries": 4} | overrides
    return OpenAICompatLLM("test-model", base_url=url, **options)


def gaps(server: ScriptedLLMServer) -> list[float]:
    times = [r.at for r in server.received]
    return [later - earlier for earlier, later in zip(times, times[1:], strict=False)]


def test_it_is_an_llm(server):
    assert isinstance(client(server.url), LLM)


def test_plain_completion_returns_text_and_reported_usage(server):
    server.script(Reply(200, completion("Port 8000 [1].", {"prompt_tokens": 42, "completion_tokens": 5})))
    result = client(server.url).generate(MESSAGES, max_tokens=50, temperature=0.2)
    assert result.text == "Port 8000 [1]."
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (42, 5)
    assert result.finish_reason == "stop"
    (request,) = server.received
    assert request.body == {
        "model": "test-model",
        "messages": MESSAGES,
        "max_tokens": 50,
        "temperature": 0.2,
        "stream": False,
    }


def test_prompt_tokens_the_server_had_cached_are_reported(server):
    reported = {"prompt_tokens": 900, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 640}}
    server.script(Reply(200, completion("ok", reported)), Stream(["o", "k"], usage=reported))
    llm = client(server.url)
    assert llm.generate(MESSAGES, max_tokens=5).usage.as_dict()["cached_tokens"] == 640
    stream = llm.stream(MESSAGES, max_tokens=5)
    assert "".join(stream) == "ok" and stream.usage.cached_tokens == 640


def test_api_key_is_sent_as_bearer_token(server):
    server.script(Reply(200, completion("ok")))
    OpenAICompatLLM("m", base_url=server.url, api_key="sk-test").generate(MESSAGES, max_tokens=5)
    assert server.received[0].headers["Authorization"] == "Bearer sk-test"


def test_stream_yields_the_exact_pieces_and_then_the_usage(server):
    pieces = ["Port", " 8000", " — naïve ✓", " [1]."]
    server.script(Stream(pieces, usage={"prompt_tokens": 30, "completion_tokens": 4}))
    stream = client(server.url).stream(MESSAGES, max_tokens=50)
    assert list(stream) == pieces
    assert (stream.usage.prompt_tokens, stream.usage.completion_tokens) == (30, 4)
    body = server.received[0].body
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_stream_usage_is_counted_when_the_server_reports_none(server):
    server.script(Stream(["hello", " world"]))
    llm = client(server.url)
    stream = llm.stream(MESSAGES, max_tokens=50)
    assert "".join(stream) == "hello world"
    assert stream.usage.completion_tokens == llm.count_tokens("hello world") == 2
    assert stream.usage.prompt_tokens >= llm.count_tokens("Be brief.") + llm.count_tokens("Which port?")


def test_429_waits_as_long_as_retry_after_says(server):
    server.script(
        Reply(429, {"error": {"message": "slow down"}}, headers={"Retry-After": "1"}),
        Reply(200, completion("done")),
    )
    assert client(server.url).generate(MESSAGES, max_tokens=5).text == "done"
    assert len(server.received) == 2
    assert gaps(server)[0] >= 1.0  # the backoff alone would wait 0.1-0.2s


def test_retry_after_as_an_http_date_is_honoured(server):
    """RFC 9110 allows `Retry-After: <HTTP date>`; it used to be ignored in favour of the 0.1s backoff."""
    server.script(
        Reply(503, {"error": {"message": "overloaded"}}, headers={"Retry-After": formatdate(time.time() + 3, usegmt=True)}),
        Reply(200, completion("done")),
    )
    assert client(server.url).generate(MESSAGES, max_tokens=5).text == "done"
    # The date has whole seconds, so at least 2 s of the 3 remain when it is written; the bound leaves a
    # second for the reply to reach the client on a loaded machine, and is still 10x the 0.1 s backoff.
    assert gaps(server)[0] >= 1.0


def test_5xx_is_retried_with_exponential_backoff(server):
    server.script(Reply(500, "boom"), Reply(502, "bad gateway"), Reply(200, completion("done")))
    assert client(server.url).generate(MESSAGES, max_tokens=5).text == "done"
    first, second = gaps(server)
    # wait_exponential_jitter: initial * 2**n plus up to `initial` of jitter; only lower bounds, which load cannot break
    assert first >= BACKOFF and second >= 2 * BACKOFF


def test_gives_up_after_the_last_try_with_a_clear_error(server):
    server.script(*[Reply(503, {"error": {"message": "model is loading"}})] * 4)
    with pytest.raises(LLMError) as error:
        client(server.url).generate(MESSAGES, max_tokens=5)
    assert str(error.value) == (
        f"LLM at {server.url} failed after 4 tries: HTTP 503 Service Unavailable: model is loading"
    )
    assert len(server.received) == 4


def test_other_4xx_fail_at_once_without_retry(server):
    server.script(Reply(400, {"error": {"message": "max_tokens is too large"}}), Reply(200, completion("no")))
    with pytest.raises(LLMError, match="rejected the request.*HTTP 400 Bad Request: max_tokens is too large"):
        client(server.url).generate(MESSAGES, max_tokens=5)
    assert len(server.received) == 1


def test_auth_failure_says_what_to_check(server):
    server.script(Reply(401, {"error": {"message": "invalid key"}}))
    with pytest.raises(LLMError, match=r"HTTP 401 .*invalid key \(check the api_key\)"):
        client(server.url).generate(MESSAGES, max_tokens=5)


def test_a_response_slower_than_the_read_timeout_is_retried(server):
    server.script(Reply(200, completion("late"), delay_s=3.0), Reply(200, completion("on time")))
    # "on time" comes from the second request: the first was given up after the read timeout, not awaited
    assert client(server.url, read_timeout_s=0.3).generate(MESSAGES, max_tokens=5).text == "on time"
    assert len(server.received) == 2


def test_read_timeouts_on_every_try_end_in_a_clear_error(server):
    server.script(*[Reply(200, completion("late"), delay_s=1.0)] * 2)
    with pytest.raises(LLMError, match=r"failed after 2 tries: no data within 0.2s \(read timeout\)"):
        client(server.url, read_timeout_s=0.2, max_tries=2).generate(MESSAGES, max_tokens=5)


def test_a_stream_broken_after_tokens_raises_and_is_not_retried(server):
    server.script(Stream(["one", " two", " three"], break_after=2), Stream(["again"]))
    received = []
    with pytest.raises(LLMError, match="stream from LLM at .* broke after 2 pieces: RemoteProtocolError"):
        for piece in client(server.url).stream(MESSAGES, max_tokens=5):
            received.append(piece)
    assert received == ["one", " two"]
    assert len(server.received) == 1


def test_a_stream_that_ends_without_finishing_is_an_error(server):
    server.script(Stream(["cut"], done=False))
    with pytest.raises(LLMError, match=r"broke after 1 pieces: it ended without a finish_reason or \[DONE\]"):
        list(client(server.url).stream(MESSAGES, max_tokens=5))


def test_a_stream_is_retried_until_it_opens(server):
    server.script(Reply(503, "busy"), Stream(["fine"]))
    assert list(client(server.url).stream(MESSAGES, max_tokens=5)) == ["fine"]
    assert len(server.received) == 2


def test_connection_refused_is_retried_then_reported():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(LLMError, match=f"LLM at {url} failed after 3 tries: cannot connect: .*refused"):
        client(url, max_tries=3).generate(MESSAGES, max_tokens=5)


def test_a_stream_of_keep_alives_only_times_out(server):
    """Comment lines reset the read timeout; without a deadline on text, this stream would hang as long as it lasts."""
    server.script(Stream(["never"], keepalives=400, keepalive_every_s=0.05))
    with pytest.raises(LLMError, match=r"broke after 0 pieces: no text for 0.5s \(stream_idle_timeout_s\)"):
        list(client(server.url, stream_idle_timeout_s=0.5).stream(MESSAGES, max_tokens=5))


def test_a_stream_slower_than_the_generation_deadline_is_stopped(server):
    server.script(Stream([f"w{i} " for i in range(200)], piece_delay_s=0.05))
    received = []
    with pytest.raises(LLMError, match=r"no complete answer within 0.5s \(generation_timeout_s\)"):
        async def collect():
            async for piece in client(server.url, generation_timeout_s=0.5).astream(MESSAGES, max_tokens=5):
                received.append(piece)
        asyncio.run(collect())
    assert 0 < len(received) < 200


def test_async_calls_share_the_retry_and_stream_behaviour(server):
    llm = client(server.url)

    async def scenario():
        server.script(Reply(429, "wait", headers={"Retry-After": "0"}), Reply(200, completion("async ok")))
        completion_ = await llm.agenerate(MESSAGES, max_tokens=5)
        assert completion_.text == "async ok" and len(server.received) == 2

        server.script(Reply(500, "boom"), Stream(["a", "b"], usage={"prompt_tokens": 9, "completion_tokens": 2}))
        stream = llm.astream(MESSAGES, max_tokens=5)
        assert [piece async for piece in stream] == ["a", "b"]
        assert stream.usage.completion_tokens == 2 and len(server.received) == 2

        server.script(Stream(["x", "y", "z"], break_after=1))
        received = []
        with pytest.raises(LLMError, match="broke after 1 pieces"):
            async for piece in llm.astream(MESSAGES, max_tokens=5):
                received.append(piece)
        assert received == ["x"]

        server.script(Reply(400, "bad"))
        with pytest.raises(LLMError, match="HTTP 400"):
            await llm.agenerate(MESSAGES, max_tokens=5)
        assert len(server.received) == 1

    asyncio.run(scenario())


def test_tokens_are_counted_offline_with_the_configured_encoding(server):
    assert client(server.url).count_tokens("hello world") == 2
    o200k = client(server.url, tokenizer="o200k_base")
    assert o200k.count_tokens("hello world") == 2
    # special-token text inside documents is counted as plain text, not rejected
    assert o200k.count_tokens("<|endoftext|>") > 1


def test_a_base_url_without_scheme_is_rejected_up_front():
    with pytest.raises(ValueError, match="base_url must start with http:// or https://"):
        OpenAICompatLLM("m", base_url="localhost:8000/v1")
