"""Rerankers against real models and servers: a tiny cross-encoder this test trains, a TEI-like
HTTP scorer on loopback, and an OpenAI-compatible chat server scripted per test.

No reranker weights ship with Ragline, so the cross-encoder tests build and train a
2-layer BERT of hidden size 32 on a toy pair set, and save it as any model folder is saved.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scripted_llm_server import Reply, ScriptedLLMServer, completion, free_port, make_hit

from ragline.config import RerankSettings
from ragline.generate.openai_compat import OpenAICompatLLM
from ragline.retrieve.chat import ChatModel
from ragline.retrieve.rerank import (
    CrossEncoderReranker,
    HTTPReranker,
    LLMReranker,
    Reranker,
    RerankError,
    parse_llm_scores,
)
from ragline.types import Hit

PASSAGES = {
    "save": "Save a checkpoint of the model parameters with orbax and restore it later.",
    "install": "Install the package with pip install flax and check the version.",
    "gpus": "Train on two GPUs with pmap: replicate the state across devices.",
    "json": "Read a JSON file into a dict with json load and an open file.",
}
QUESTIONS = {
    "save": "how do I save my model to disk",
    "install": "how to install it with pip",
    "gpus": "make training use two GPUs",
    "json": "read a JSON file into a dict",
}


def hits(*keys: str) -> list[Hit]:
    return [make_hit(n, PASSAGES[key], title=key.title()) for n, key in enumerate(keys)]


def ids(result: list[Hit]) -> list[str]:
    return [hit.chunk.chunk_id for hit in result]


# --- the cross-encoder -----------------------------------------------------------------------------


def train_tiny_cross_encoder(folder: Path) -> None:
    """A 2-layer BERT cross-encoder trained to score each question's own passage high and the others low."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    texts = [hit.chunk.embed_text for hit in hits(*PASSAGES)] + list(QUESTIONS.values())
    words = sorted({w for text in texts for w in re.findall(r"\w+|[^\w\s]", text.lower())})
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=128,
    )
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=1,
    )
    model = BertForSequenceClassification(config)
    passages = {key: hit.chunk.embed_text for key, hit in zip(PASSAGES, hits(*PASSAGES), strict=True)}
    pairs = [(QUESTIONS[q], passages[p], float(q == p)) for q in QUESTIONS for p in passages]
    batch = tokenizer([q for q, _, _ in pairs], [p for _, p, _ in pairs], padding=True, return_tensors="pt")
    labels = torch.tensor([label for _, _, label in pairs])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(30):
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(**batch).logits.squeeze(-1), labels)
        loss.backward()
        optimizer.step()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-cross-encoder")
    train_tiny_cross_encoder(folder)
    return folder


def test_cross_encoder_orders_by_the_models_own_scores(tiny_model):
    from sentence_transformers import CrossEncoder

    reranker = CrossEncoderReranker(tiny_model, batch_size=2)
    assert isinstance(reranker, Reranker)
    candidates = hits("save", "install", "json", "gpus")
    result = reranker.rerank(QUESTIONS["gpus"], candidates)

    independent = CrossEncoder(str(tiny_model), local_files_only=True)
    scores = independent.predict([(QUESTIONS["gpus"], hit.chunk.embed_text) for hit in candidates])
    expected = [candidates[i].chunk.chunk_id for i in np.argsort(-scores, kind="stable")]
    assert ids(result) == expected
    assert [hit.score for hit in result] == pytest.approx(sorted(scores.tolist(), reverse=True), abs=1e-5)
    assert sorted(ids(result)) == sorted(ids(candidates))


@pytest.mark.parametrize("topic", list(QUESTIONS))
def test_cross_encoder_puts_the_passage_it_learned_first(tiny_model, topic):
    candidates = hits("save", "install", "json", "gpus")
    result = CrossEncoderReranker(tiny_model).rerank(QUESTIONS[topic], candidates)
    assert result[0].chunk.text == PASSAGES[topic]


def test_cross_encoder_keeps_the_vectors_and_answers_threads_alike(tiny_model):
    reranker = CrossEncoderReranker(tiny_model)
    candidates = [Hit(h.chunk, h.score, vector=np.full(4, n, np.float32)) for n, h in enumerate(hits(*PASSAGES))]
    results: list[list[Hit]] = []
    threads = [
        threading.Thread(target=lambda: results.append(reranker.rerank(QUESTIONS["json"], candidates)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and all(ids(r) == ids(results[0]) for r in results)
    for hit in results[0]:
        original = next(c for c in candidates if c.chunk.chunk_id == hit.chunk.chunk_id)
        assert hit.vector is original.vector


def test_cross_encoder_refuses_what_is_not_a_reranker(tmp_path):
    with pytest.raises(RerankError, match="does not exist"):
        CrossEncoderReranker(tmp_path / "missing")
    with pytest.raises(RerankError, match="not a model folder"):
        CrossEncoderReranker(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(RerankError, match="BertModel, not a cross-encoder"):
        CrossEncoderReranker(tmp_path)


def test_cross_encoder_reports_a_broken_folder_when_it_loads(tmp_path):
    config = {"architectures": ["BertForSequenceClassification"], "model_type": "bert"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    reranker = CrossEncoderReranker(tmp_path)  # cheap: nothing is read until the first search
    with pytest.raises(RerankError, match=f"cannot load the cross-encoder in {tmp_path}"):
        reranker.rerank("q", hits("save"))


# --- the HTTP reranker ------------------------------------------------------------------------------


def overlap(query: str, text: str) -> float:
    words = set(re.findall(r"\w+", query.lower()))
    return len(words & set(re.findall(r"\w+", text.lower()))) / max(len(words), 1)


class TEIServer:
    """A TEI-like `/rerank` on loopback scoring by word overlap; `script` queues raw replies to send first."""

    def __init__(self, shape: str = "tei") -> None:
        self.shape = shape
        self.delay_s = 0.0
        self.script: list[tuple[int, Any]] = []
        self.received: list[dict[str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.received.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                status, reply = server.script.pop(0) if server.script else (200, server.score(body))
                time.sleep(server.delay_s)
                data = (reply if isinstance(reply, str) else json.dumps(reply)).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def score(self, body: dict[str, Any]) -> Any:
        ranks = sorted(
            ({"index": i, "score": overlap(body["query"], text)} for i, text in enumerate(body["texts"])),
            key=lambda rank: -rank["score"],
        )
        if self.shape == "tei":
            return ranks
        return {"results": [{"index": r["index"], "relevance_score": r["score"]} for r in ranks]}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> TEIServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="module")
def tei_server():
    with TEIServer() as server:
        yield server


@pytest.fixture
def tei(tei_server):
    tei_server.delay_s, tei_server.script, tei_server.received = 0.0, [], []
    return tei_server


def http_reranker(url: str, **options: Any) -> HTTPReranker:
    return HTTPReranker(url, **{"backoff_initial_s": 0.05, "timeout_s": 5.0, "max_tries": 3, **options})


@pytest.mark.parametrize("shape", ["tei", "cohere"])
def test_http_reranker_orders_by_the_servers_scores(shape):
    with TEIServer(shape) as server:
        candidates = hits("save", "install", "gpus", "json")
        query = "read a json file into a dict"
        result = http_reranker(server.url, model="bge-reranker-base", api_key="k").rerank(query, candidates)
    assert ids(result)[0] == candidates[3].chunk.chunk_id
    assert [hit.score for hit in result] == sorted(
        (overlap(query, h.chunk.embed_text) for h in candidates), reverse=True
    )
    (request,) = server.received
    assert request == {
        "path": "/rerank",
        "auth": "Bearer k",
        "query": query,
        "truncate": True,
        "model": "bge-reranker-base",
        "texts": [hit.chunk.embed_text for hit in candidates],
    }


def test_http_reranker_retries_a_503_then_succeeds(tei):
    tei.script = [(503, {"error": "model loading"})]
    result = http_reranker(tei.url).rerank("two GPUs", hits("save", "gpus"))
    assert ids(result) == ["c1", "c0"]
    assert len(tei.received) == 2


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ('{"error": "oops"}', "expected a list"),
        ([{"index": 0, "score": 0.5}, {"index": 7, "score": 0.1}], "index 7 is not one of the 2 texts"),
        ([{"index": 0, "score": 0.5}, {"index": 0, "score": 0.1}], "text 0 was scored twice"),
        ([{"index": 0, "score": 0.5}], "1 of 2 texts have no score"),
        ([{"index": 0, "score": "high"}, {"index": 1, "score": 0.1}], "text 0 has no finite score"),
        ("<html>bad gateway</html>", "unexpected body"),
    ],
)
def test_http_reranker_rejects_a_malformed_answer_at_once(tei, reply, reason):
    tei.script = [(200, reply)]
    with pytest.raises(RerankError, match=f"reranker at {tei.url}/rerank sent an unexpected body") as error:
        http_reranker(tei.url).rerank("q", hits("save", "gpus"))
    assert reason in str(error.value)
    assert len(tei.received) == 1


def test_http_reranker_does_not_retry_a_client_error(tei):
    tei.script = [(401, {"error": "bad key"})]
    with pytest.raises(RerankError, match=r"HTTP 401 .*check retrieve.rerank.api_key"):
        http_reranker(tei.url).rerank("q", hits("save"))
    assert len(tei.received) == 1


def test_http_reranker_gives_up_after_its_tries(tei):
    tei.script = [(503, {"error": "overloaded"})] * 3
    with pytest.raises(RerankError, match=r"failed after 3 tries .*: HTTP 503"):
        http_reranker(tei.url).rerank("q", hits("save"))
    assert len(tei.received) == 3


def test_http_reranker_ends_a_slow_call_by_its_deadline(tei):
    tei.delay_s = 2.0
    with pytest.raises(RerankError, match=f"reranker at {tei.url}/rerank .*(ReadTimeout|no answer within 0.3s)"):
        http_reranker(tei.url, timeout_s=0.3, max_tries=5).rerank("q", hits("save"))


def test_http_reranker_names_an_unreachable_server():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RerankError, match=f"reranker at {url}/rerank failed after 2 tries .*: ConnectError"):
        http_reranker(url, max_tries=2).rerank("q", hits("save"))


def test_http_reranker_sends_nothing_for_no_hits(tei):
    assert http_reranker(tei.url).rerank("q", []) == []
    assert tei.received == []


# --- the LLM reranker -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat():
    with ScriptedLLMServer() as server:
        yield server


def llm(url: str) -> OpenAICompatLLM:
    return OpenAICompatLLM("judge", base_url=url, max_tries=1, read_timeout_s=5.0)


def test_a_served_llm_is_a_chat_model(chat):
    assert isinstance(llm(chat.url), ChatModel)


def test_llm_reranker_scores_numbered_passages_in_batches(chat):
    chat.script(
        Reply(200, completion('```json\n{"1": 2, "2": 9, "3": 5}\n```\nPassage 2 answers it.')),
        Reply(200, completion('{"1": 7}')),
    )
    candidates = hits("save", "install", "gpus", "json")
    result = LLMReranker(llm(chat.url), batch_size=3, max_tokens=40).rerank("make training use two GPUs", candidates)
    assert ids(result) == ["c1", "c3", "c2", "c0"]
    assert [hit.score for hit in result] == [9.0, 7.0, 5.0, 2.0]
    first, second = (r.body for r in chat.received)
    assert (first["temperature"], first["max_tokens"]) == (0.0, 40)
    prompt = first["messages"][-1]["content"]
    assert "make training use two GPUs" in prompt
    assert all(f"[{n}] {hit.chunk.embed_text}" in prompt for n, hit in enumerate(candidates[:3], start=1))
    assert f"[1] {candidates[3].chunk.embed_text}" in second["messages"][-1]["content"]


def test_llm_reranker_keeps_the_place_of_passages_it_could_not_score(chat):
    chat.script(
        Reply(200, completion("I cannot rate these passages.")),
        Reply(200, completion('{"1": 3, "2": "n/a", "3": 8}')),
    )
    candidates = hits("save", "install", "gpus", "json", "save", "install")
    result = LLMReranker(llm(chat.url), batch_size=3).rerank("q", candidates)
    # the first batch was not scored: those passages stay first, in their order; passage 5 keeps its slot
    assert ids(result) == ["c0", "c1", "c2", "c5", "c4", "c3"]
    scores = [hit.score for hit in result]
    assert scores == sorted(scores, reverse=True)


def test_llm_reranker_survives_a_failing_model(chat):
    chat.script(Reply(500, {"error": {"message": "out of memory"}}))
    candidates = hits("save", "install")
    assert LLMReranker(llm(chat.url), batch_size=5).rerank("q", candidates) == candidates


def test_llm_reranker_runs_batches_concurrently_with_the_same_result():
    def judge(body: dict[str, Any]) -> Reply:
        passages = re.findall(r"\[(\d+)\] ([^\n]*)\n\n([^\n]*)", body["messages"][-1]["content"])
        return Reply(200, completion(json.dumps({n: 10 if "GPU" in text else 1 for n, _, text in passages})))

    with ScriptedLLMServer(fallback=judge) as server:
        candidates = hits("save", "install", "json", "save", "gpus", "json", "install")
        serial = LLMReranker(llm(server.url), batch_size=2).rerank("two GPUs", candidates)
        parallel = LLMReranker(llm(server.url), batch_size=2, concurrency=4).rerank("two GPUs", candidates)
    assert ids(serial) == ids(parallel) == ["c4", "c0", "c1", "c2", "c3", "c5", "c6"]


@pytest.mark.parametrize(
    ("reply", "scores"),
    [
        ('{"1": 8, "2": 3.5}', {1: 8.0, 2: 3.5}),
        ("Scores:\n1: 8\n2: 3\n", {1: 8.0, 2: 3.0}),
        ("{'1': 8, '2': 3}", {1: 8.0, 2: 3.0}),
        ("[4, 6]", {1: 4.0, 2: 6.0}),
        ('{"1": 11, "2": -1, "3": 5}', {}),
        ("no idea", {}),
    ],
)
def test_llm_scores_are_parsed_leniently(reply, scores):
    assert parse_llm_scores(reply, 2) == scores


def test_rerankers_are_built_from_settings(tiny_model, tei, chat):
    settings = RerankSettings(backend="cross-encoder", model=str(tiny_model), batch_size=4, max_length=64)
    cross = CrossEncoderReranker.from_settings(settings)
    assert (cross.folder, cross.batch_size, cross.max_length) == (tiny_model, 4, 64)
    assert cross.rerank(QUESTIONS["json"], hits("save", "json"))[0].chunk.text == PASSAGES["json"]

    settings = RerankSettings(backend="http", base_url=tei.url, model="bge", api_key="secret", timeout_s=2)
    HTTPReranker.from_settings(settings).rerank("q", hits("save"))
    assert tei.received[0]["auth"] == "Bearer secret"

    settings = RerankSettings(backend="llm", batch_size=2)
    assert LLMReranker.from_settings(settings, lambda: llm(chat.url)).batch_size == 2
    with pytest.raises(RerankError, match="needs an LLM"):
        LLMReranker.from_settings(settings, lambda: None)
