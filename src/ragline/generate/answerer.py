"""Turn retrieved hits and a question into a cited `Answer`, streamed or whole.

The answerer never raises for a model failure and never waits without
bound: backends time out and give up with `LLMError`, and the answer then
falls back to sentences extracted from the hits, with a note saying why.
A streamed answer yields text pieces, each claim checked against the passages
as soon as it is complete, then the final `Answer`; if the model broke
mid-stream, that final answer (the extractive one) replaces the pieces shown
so far. A cheap model that fails before writing anything hands
the question to the strong model, and only then to extraction.

Routing and prompt building (token counting) block, so the async path runs
them in a worker thread: the event loop only relays pieces.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from anyio import to_thread

from ragline import registry
from ragline.embed.base import EmbedderError
from ragline.generate.base import LLM, LLMError, Usage
from ragline.generate.context import Context, ContextSelector
from ragline.generate.extractive import ExtractiveAnswerer
from ragline.generate.prompt import CITATION_RUN, NO_ANSWER, Prompt, build_prompt, check_citations, citation
from ragline.generate.verify import DEFAULT_MIN_RELEVANCE, Verifier, build_scorer, split_claims
from ragline.config import GenerateSettings, LLMSettings
from ragline.types import Answer, AnswerEvent, ClaimEvent, Hit, TokenEvent

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from ragline.embed.base import Embedder
    from ragline.generate.router import Router

ABSTAINED = (
    "no sentence of the draft answer is supported by the passages, so it was withheld; the closest passages are listed"
)
NOT_RELEVANT = (
    "no passage is relevant enough to answer from (best sentence {confidence:.2f}, below generate.verify.min_relevance "
    "{threshold:g}), so no answer was drafted; the closest passages are listed"
)

_PARTIAL_CITATION = re.compile(r"\[[\d,\s]*$")
"""A citation run still being written, e.g. `[1, 3`."""

GenerationEvent = TokenEvent | ClaimEvent | AnswerEvent
"""What the answerer streams: text pieces and checked claims, then the final answer (always last)."""


def build_llm(settings: LLMSettings, data_dir: Path) -> LLM | None:
    """The configured model, or None for the extractive answerer."""
    if settings.backend == "extractive":
        return None
    return registry.resolve("llm", settings.backend).from_settings(settings, data_dir)


def _words(text: str) -> int:
    """A token count for the extractive answerer, which has no tokenizer and no budget to meet."""
    return len(text.split())


class _Turn:
    """One question being answered: which model, the prompt, the clock and the text so far."""

    def __init__(self, answerer: Answerer, question: str, hits: Sequence[Hit]):
        self.answerer = answerer
        self.question = question
        self.hits = list(hits)
        self.started = time.perf_counter()
        self.first_piece_at: float | None = None
        self.pieces: list[str] = []
        self.llm = answerer.pick(question)
        self.prompt: Prompt | None = None
        self.notes: list[str] = []
        """What went wrong on the way to the final answer, e.g. a cheap model that failed."""
        self.claims_sent = 0
        """Claims of the streamed draft already checked and sent as `ClaimEvent`s."""
        self.fell_back = False
        if answerer.cheap_unavailable and self.llm is not None:
            self.notes.append(
                f"the cheap model could not be loaded, so the strong model answers every question: "
                f"{answerer.cheap_unavailable}"
            )

    def start(self) -> Answer | None:
        """Select the context and build the prompt; return the final answer instead when there is nothing
        to ask a model (no model, no passages, or none relevant enough)."""
        answerer = self.answerer
        threshold = answerer.min_relevance if answerer.abstain else None
        try:
            count_tokens = self.llm.count_tokens if self.llm is not None else _words
            context = answerer.selector.select(self.question, self.hits, count_tokens, confidence=threshold is not None)
        except LLMError as exc:  # e.g. a local model that cannot be loaded to count tokens
            return self.failed(exc)
        except EmbedderError as exc:  # an embedding service down: the model reads whole passages, unscored
            log.warning("passages not scored for relevance: %s", exc)
            context = Context.whole(self.hits)
        if threshold is not None and context.confidence is not None and context.confidence < threshold:
            note = NOT_RELEVANT.format(confidence=context.confidence, threshold=threshold)
            model = self.llm.name if self.llm is not None else answerer.extractive.name
            return self._timed(Answer(NO_ANSWER, [], self.hits, model, grounded=False, note=note, abstained=True))
        if self.llm is None:
            answer = answerer.verified(answerer.extractive.answer(self.question, self.hits))
            if answerer.unavailable:
                answer.note = f"no LLM could be loaded, so this answer was extracted from the documents: {answerer.unavailable}"
            return self._timed(answer)
        if not self.hits:
            return self._no_answer("no passages were retrieved")
        try:
            self.prompt = build_prompt(
                self.question,
                context.hits,
                count_tokens=self.llm.count_tokens,
                context_window=self.llm.context_window,
                input_fraction=answerer.input_fraction,
                max_answer_tokens=answerer.max_answer_tokens,
                texts=context.texts,
            )
        except LLMError as exc:
            return self.failed(exc)
        if not self.prompt.hits:
            return self._no_answer("no passage fits the model's input budget")
        return None

    def _no_answer(self, note: str) -> Answer:
        assert self.llm is not None
        return self._timed(Answer(NO_ANSWER, [], [], self.llm.name, grounded=False, note=note))

    def add(self, piece: str) -> TokenEvent:
        if self.first_piece_at is None:
            self.first_piece_at = time.perf_counter()
        self.pieces.append(piece)
        return TokenEvent(piece)

    def _complete_claims(self) -> int:
        """How many claims of the draft are complete: all but the last, and the last too once a word
        follows it (text after it that is not a citation run of its own)."""
        draft = "".join(self.pieces).lstrip()
        claims = split_claims(draft)
        if not claims:
            return 0
        rest = _PARTIAL_CITATION.sub("", CITATION_RUN.sub("", draft[claims[-1].span.end :]))
        return len(claims) if re.search(r"[^\W\d_]", rest) else len(claims) - 1

    def claims_complete(self) -> bool:
        """Whether the draft holds a complete claim not yet sent (cheap: splitting only)."""
        if self.answerer.verifier is None or self.prompt is None:
            return False
        return self._complete_claims() > self.claims_sent

    def checked_claims(self) -> list[ClaimEvent]:
        """The draft's complete claims not yet sent, checked against the passages. The whole draft is
        checked, as the final answer will be, so that the offsets match the final answer's."""
        if self.answerer.verifier is None or self.prompt is None:
            return []
        complete = self._complete_claims()
        if complete <= self.claims_sent:
            return []
        check = self.answerer.verifier.verify("".join(self.pieces).lstrip(), self.prompt.hits)
        events = [ClaimEvent(i, check.claims[i]) for i in range(self.claims_sent, complete)]
        self.claims_sent = complete
        return events

    def final(self, answer: Answer) -> list[ClaimEvent | AnswerEvent]:
        """The final answer, after the claims of it not yet sent; all of them when it replaced the draft."""
        if answer.abstained or self.fell_back:
            self.claims_sent = 0
        rest = [ClaimEvent(i, claim) for i, claim in enumerate(answer.claims) if i >= self.claims_sent]
        return [*rest, AnswerEvent(answer)]

    def finish(self, usage: Usage) -> Answer:
        assert self.llm is not None and self.prompt is not None
        text = "".join(self.pieces).strip()
        citations, grounded = check_citations(text, self.prompt.hits)
        answer = Answer(text, citations, self.prompt.hits, self.llm.name, grounded, usage=usage.as_dict())
        return self._timed(self.answerer.verified(answer))

    def failed(self, error: LLMError) -> Answer | None:
        """After a model failure: a cheap model that wrote nothing yet hands over to the strong one
        (None: ask it); otherwise the answer is extracted from the hits."""
        strong = self.answerer.llm
        if self.llm is self.answerer.cheap_llm and strong is not None and self.llm is not strong and not self.pieces:
            assert self.llm is not None
            self.notes.append(f"the cheap model {self.llm.name} failed, so the strong model {strong.name} answered: {error}")
            self.llm = strong
            return self.start()
        return self.fall_back(error)

    def fall_back(self, error: LLMError) -> Answer:
        assert self.llm is not None
        self.fell_back = True
        answer = self.answerer.verified(self.answerer.extractive.answer(self.question, self.hits))
        answer.note = f"the LLM {self.llm.name} failed, so this answer was extracted from the documents: {error}"
        return self._timed(answer)

    def _timed(self, answer: Answer) -> Answer:
        answer.note = "; ".join(note for note in (*self.notes, answer.note) if note)
        now = time.perf_counter()
        answer.timings["generate_ms"] = (now - self.started) * 1000
        if self.first_piece_at is not None:
            answer.timings["ttft_ms"] = (self.first_piece_at - self.started) * 1000
        return answer


class Answerer:
    """Answers from an LLM (optionally routed between a cheap and a strong one) or, without one, extracted.

    `input_fraction` of the model's context window is for the prompt, the
    rest for the answer, capped at `max_answer_tokens`.
    """

    def __init__(
        self,
        llm: LLM | None,
        *,
        cheap_llm: LLM | None = None,
        router: Router | None = None,
        extractive: ExtractiveAnswerer | None = None,
        input_fraction: float = 0.5,
        max_answer_tokens: int | None = 1024,
        temperature: float = 0.1,
        unavailable: str = "",
        cheap_unavailable: str = "",
        verifier: Verifier | None = None,
        abstain: bool = False,
        selector: ContextSelector | None = None,
        min_relevance: float | None = None,
    ):
        if (cheap_llm is None) != (router is None):
            raise ValueError("a cheap model and a router go together: give both or neither")
        self.llm = llm
        self.cheap_llm = cheap_llm
        self.router = router
        self.extractive = extractive or ExtractiveAnswerer()
        self.input_fraction = input_fraction
        self.max_answer_tokens = max_answer_tokens
        self.temperature = temperature
        self.unavailable = unavailable
        """Why the configured LLM could not be built, when answers are extracted instead."""
        self.cheap_unavailable = cheap_unavailable
        """Why the cheap model could not be built, when the strong one answers everything."""
        self.verifier = verifier
        """Checks every answer claim by claim and rewrites its citations; None: citations are only numbered."""
        self.abstain = abstain
        self.selector = selector or ContextSelector(None, None)
        """Picks what the model reads of the passages, and scores how relevant they are."""
        self.min_relevance = min_relevance
        """Abstain without asking a model below this retrieval confidence (needs a selector with a scorer)."""

    @classmethod
    def from_settings(cls, settings: GenerateSettings, data_dir: Path, embedder: Embedder | None = None) -> Answerer:
        """Build from the config; a model that cannot be loaded degrades to extraction, with a note.
        `embedder` (the index's model) serves the verifier's embedding scores."""
        try:
            llm, unavailable = build_llm(settings.llm, data_dir), ""
        except LLMError as exc:
            llm, unavailable = None, str(exc)
        cheap_llm = router = None
        cheap_unavailable = ""
        if settings.router.enabled and settings.cheap_llm is not None:  # validated: both or neither
            from ragline.generate.router import DEFAULT_EXAMPLES, Router, router_path  # scikit-learn only when routing

            try:
                cheap_llm = build_llm(settings.cheap_llm, data_dir)
            except LLMError as exc:  # the strong model answers everything, with a note
                cheap_unavailable = str(exc)
            else:
                router = Router.load_or_train(
                    router_path(settings.router, data_dir),
                    settings.router.examples or DEFAULT_EXAMPLES,
                )
        verify = settings.verify
        min_relevance = DEFAULT_MIN_RELEVANCE.get(verify.method) if verify.min_relevance is None else verify.min_relevance
        min_relevance = min_relevance or None  # 0: always ask
        needs_scorer = verify.enabled or settings.context_tokens is not None or bool(verify.abstain and min_relevance)
        scorer = build_scorer(verify.method, embedder=embedder, model=verify.model) if needs_scorer else None
        return cls(
            llm,
            cheap_llm=cheap_llm,
            router=router,
            input_fraction=settings.input_fraction,
            max_answer_tokens=settings.max_answer_tokens,
            temperature=settings.temperature,
            unavailable=unavailable,
            cheap_unavailable=cheap_unavailable,
            verifier=Verifier.from_settings(verify, scorer=scorer) if verify.enabled else None,
            abstain=verify.abstain,
            selector=ContextSelector(scorer, settings.context_tokens),
            min_relevance=min_relevance,
        )

    def verified(self, answer: Answer) -> Answer:
        """The answer checked claim by claim against its passages, its citations rewritten to the supporting
        ones; withheld (abstained) when `abstain` is on and no claim is supported."""
        if self.verifier is None:
            return answer
        try:
            check = self.verifier.verify(answer.text, answer.hits)
        except EmbedderError as exc:  # the answer stands, unchecked, and says so
            log.warning("claims not checked: %s", exc)
            answer.note = "; ".join(note for note in (answer.note, f"claims not checked: {exc}") if note)
            return answer
        answer.text, answer.claims, answer.supported_share = check.text, check.claims, check.supported_share
        answer.citations = [citation(n, answer.hits[n - 1]) for n in check.cited]
        answer.grounded = check.grounded
        if self.abstain and check.claims and not any(claim.supported for claim in check.claims):
            answer.text, answer.citations, answer.claims, answer.abstained = NO_ANSWER, [], [], True
            answer.note = "; ".join(note for note in (answer.note, ABSTAINED) if note)
        return answer

    def load(self) -> None:
        """Load every model now (servers call this at startup, in a worker thread).

        A model that fails to load is dropped as if it could not be built: the
        strong model stands in for the cheap one, extraction for the strong one.
        """
        if self.cheap_llm is not None:
            try:
                self.cheap_llm.load()
            except LLMError as exc:
                self.cheap_llm, self.router, self.cheap_unavailable = None, None, str(exc)
        if self.llm is not None:
            try:
                self.llm.load()
            except LLMError as exc:
                self.llm, self.unavailable = None, str(exc)

    def pick(self, question: str) -> LLM | None:
        if self.router is not None and self.router.choose(question) == "cheap":
            return self.cheap_llm
        return self.llm

    def _start(self, question: str, hits: Sequence[Hit]) -> tuple[_Turn, Answer | None]:
        """Route and build the prompt (blocking work); the answer comes back at once when no model is asked."""
        turn = _Turn(self, question, hits)
        return turn, turn.start()

    def stream(self, question: str, hits: Sequence[Hit]) -> Iterator[GenerationEvent]:
        turn, answer = self._start(question, hits)
        while answer is None:  # again only when a cheap model failed and the strong one takes over
            assert turn.llm is not None and turn.prompt is not None
            pieces = turn.llm.stream(turn.prompt.messages, max_tokens=turn.prompt.max_tokens, temperature=self.temperature)
            try:
                for piece in pieces:
                    yield turn.add(piece)
                    yield from turn.checked_claims()
                answer = turn.finish(pieces.usage)
            except LLMError as exc:
                answer = turn.failed(exc)
            finally:
                pieces.close()
        yield from turn.final(answer)

    async def astream(self, question: str, hits: Sequence[Hit]) -> AsyncIterator[GenerationEvent]:
        """`stream` for the event loop: prompt building and claim checking (an embedding model) run in
        worker threads."""
        turn, answer = await to_thread.run_sync(self._start, question, hits)
        while answer is None:
            assert turn.llm is not None and turn.prompt is not None
            pieces = turn.llm.astream(turn.prompt.messages, max_tokens=turn.prompt.max_tokens, temperature=self.temperature)
            try:
                async for piece in pieces:
                    yield turn.add(piece)
                    if turn.claims_complete():
                        for event in await to_thread.run_sync(turn.checked_claims):
                            yield event
                answer = await to_thread.run_sync(turn.finish, pieces.usage)
            except LLMError as exc:
                answer = await to_thread.run_sync(turn.failed, exc)
            finally:
                await pieces.aclose()
        for event in turn.final(answer):
            yield event

    def answer(self, question: str, hits: Sequence[Hit]) -> Answer:
        *_, final = self.stream(question, hits)
        assert isinstance(final, AnswerEvent)
        return final.answer

    async def aanswer(self, question: str, hits: Sequence[Hit]) -> Answer:
        final = [event async for event in self.astream(question, hits)][-1]
        assert isinstance(final, AnswerEvent)
        return final.answer
