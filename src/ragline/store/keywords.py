"""Code-aware terms for the keyword index: identifiers match as wholes and by their parts.

Documentation questions name code (`read_csv`, `os.path.join`, `max_workers`,
`DataFrame`) as often as they use words. Each identifier is indexed whole
(dots and underscores folded to `_`, so `os.path.join` and `os_path_join`
are one term), by every dotted suffix (`path_join`), and by its parts split at
`.`, `_` and camelCase humps: a query for `read csv`, `read_csv` or
`pandas.read_csv` finds the same passage, the exact spelling ranking first
because the whole term is rarer than its parts. Queries drop English stop
words and question words, so "how do I ..." does not dominate the ranking.
Stemming (Porter) is left to the FTS5 tokenizer, applied alike to both sides.

A query scores only its informative terms (`scored_terms`). BM25 costs a few
microseconds per chunk that contains a term, so a term found in a large share
of a big index (`word`, `value`, the `w` of `w2`) would cost hundreds of
milliseconds at 100k chunks while weighing next to nothing: its idf is small,
and nil past half the chunks (FTS5 then counts it as 1e-6). Such terms are
left out once they occur in more than `common_cutoff(chunks)` chunks; the
rarest term always stays, so a query of common words still finds something.
Terms below that share still weigh, so they are kept: leaving them out too
was faster but found the right page less often (see `COMMON_SHARE`).
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence

_TOKEN = re.compile(r"[^\W\d_][\w]*(?:\.[^\W\d_][\w]*)*|\d+(?:\.\d+)*", re.UNICODE)
_HUMPS = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")
HEADING_WEIGHT = 2.0
"""BM25 weight of a chunk's title and heading path against its body (1.0): a heading names the topic."""
MAX_COUNTED_TERMS = 50_000
"""A store's per-generation memo of term counts is emptied past this many terms (a long run of distinct queries)."""
MAX_TERMS_PER_QUERY = 64
"""A query term list is cut here: a pasted page must not make an FTS5 query of thousands of terms."""
COMMON_SHARE = 0.5
"""A term in more than this share of the chunks is left out of a query: FTS5 gives it an idf of ~0, so it only
costs time. Lower shares were faster and worse: with the rule applied to the Flax dev index (211 questions),
page hit@5 went from 0.896 to 0.891 at 0.1, 0.882 at 0.2 and 0.858 at 0.05; it held at 0.5..."""
COMMON_FLOOR = 1_000
"""...once it is in more than this many: scoring that many chunks takes a few milliseconds, so a small index
scores every term (and answers exactly as plain BM25 over all of them)."""

STOP_WORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below between both
    but by can could did do does doing down during each few for from further had has have having he her here hers
    herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off on once
    only or other our ours ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were what when where which
    while who whom why will with would you your yours yourself yourselves get got want wanted need needs please
    tell know way ways thing things someone something anyone anything use using used""".split()
)
"""Left out of queries only: in a passage they are rare enough in BM25's view to do no harm."""


def _parts(identifier: str) -> list[str]:
    pieces = [piece for piece in re.split(r"[._]", identifier) if piece]
    return [hump.lower() for piece in pieces for hump in _HUMPS.findall(piece) or [piece]]


def _identifier_terms(token: str) -> Iterator[str]:
    segments = [segment for segment in token.split(".") if segment]
    lowered = [segment.lower() for segment in segments]
    for start in range(len(lowered) - 1):  # each dotted suffix: os_path_join, path_join
        yield "_".join(lowered[start:])
    whole = lowered[-1]
    parts = _parts(token)
    if len(segments) == 1 or len(parts) > 1 or whole != parts[-1]:
        yield whole
    yield from parts


def terms(text: str) -> Iterator[str]:
    """Every term of `text` as the index stores it (lowercase, wholes before parts)."""
    for match in _TOKEN.finditer(text):
        token = match.group()
        if token[0].isdigit():
            yield token
            continue
        seen = set()
        for term in _identifier_terms(token):
            if term not in seen:
                seen.add(term)
                yield term


def index_text(text: str) -> str:
    """The text an FTS5 column is given: the terms separated by spaces."""
    return " ".join(terms(text))


def query_terms(text: str) -> list[str]:
    """The distinct terms of a query, stop words left out (all of them kept if nothing else remains)."""
    distinct = list(dict.fromkeys(terms(text)))
    kept = [term for term in distinct if term not in STOP_WORDS] or distinct
    return kept[:MAX_TERMS_PER_QUERY]


def common_cutoff(chunks: int) -> int:
    """The most chunks a query term may occur in and still be scored, in an index of `chunks` chunks."""
    return max(COMMON_FLOOR, int(COMMON_SHARE * chunks))


def scored_terms(terms: list[str], counts: Mapping[str, int], cutoff: int) -> list[str]:
    """The terms worth scoring, given how many chunks hold each.

    Those found in 1 to `cutoff` chunks, in query order; if there are none,
    the rarest term that occurs at all (the first of equally rare ones).
    `counts` may stop counting at `cutoff` + 1, except when no term is within
    the cutoff: the rarest one is then chosen by exact counts.
    """
    kept = [term for term in terms if 0 < counts[term] <= cutoff]
    if kept:
        return kept
    occurring = [term for term in terms if counts[term] > 0]
    return [min(occurring, key=counts.__getitem__)] if occurring else []


def phrase(term: str) -> str:
    """A term as an FTS5 string, so that no term is read as an operator (OR, NEAR, -)."""
    return '"' + term.replace('"', '""') + '"'


def fts_query(terms: list[str]) -> str | None:
    """An FTS5 MATCH expression any of whose terms may match (BM25 ranks them), or None for no terms."""
    return " OR ".join(map(phrase, terms)) or None


def heading_text(metadata: Mapping) -> str:
    """What a chunk's keyword heading field holds: its heading path, or its document's title."""
    return " ".join(metadata.get("heading_path") or ()) or str(metadata.get("title", ""))


class _PorterStemmer:
    """Porter stems made by SQLite FTS5's own tokenizer, the one the local store indexes with.

    Stores whose engine does not stem as FTS5 does (Qdrant's sparse vectors, Milvus Lite's analyzer) stem
    terms before the engine sees them, alike for chunks and queries, so every store matches the same words.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
        self._db.executescript(
            "CREATE VIRTUAL TABLE terms USING fts5(text, tokenize=\"porter unicode61 tokenchars '_'\");"
            "CREATE VIRTUAL TABLE stems USING fts5vocab(terms, 'instance');"
        )

    def __call__(self, texts: Sequence[str]) -> list[list[str]]:
        """Each text's stems, in order."""
        stems: list[list[str]] = [[] for _ in texts]
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany("INSERT INTO terms(rowid, text) VALUES (?, ?)", enumerate(texts))
                for row, term in self._db.execute("SELECT doc, term FROM stems ORDER BY doc, offset"):
                    stems[row].append(term)
            finally:
                self._db.execute("ROLLBACK")
        return stems


porter_stems = _PorterStemmer()
"""`porter_stems(texts)`: each text's Porter stems in order (thread-safe)."""
