"""Does a retrieved passage come from the gold page (and section) of a question?

Gold sources are public URLs (`https://host/en/latest/guides/x.html#anchor`);
an index may have been built with another url_template, or none (file://
URIs), so pages are compared by path, not by whole URL: see `same_page`.
"""

from __future__ import annotations

from functools import lru_cache
from urllib.parse import unquote, urlsplit

DOC_SUFFIXES = (".html", ".htm", ".md", ".markdown", ".rst", ".ipynb", ".txt")


@lru_cache(maxsize=65536)
def page_path(url: str) -> tuple[str, ...]:
    """The page's path segments without scheme, host, query, anchor or document suffix;
    a folder is its `index` page (`guides/` = `guides/index.html` = `guides/index.md`)."""
    path = unquote(urlsplit(url.strip()).path)
    segments = [segment for segment in path.split("/") if segment and segment != "."]
    if not segments or path.endswith("/"):
        segments.append("index")
    last = segments[-1]
    for suffix in DOC_SUFFIXES:
        if last.lower().endswith(suffix) and len(last) > len(suffix):
            segments[-1] = last[: -len(suffix)]
            break
    return tuple(segments)


def anchor_of(url: str) -> str:
    """The `#anchor`, percent-decoded and lower-cased ("" for none)."""
    return unquote(url.partition("#")[2]).strip().lower()


def _suffix_match(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    shorter, longer = sorted((a, b), key=len)
    return longer[len(longer) - len(shorter):] == shorter


def same_page(gold: str, url: str, source: str | None = None) -> bool:
    """True when the passage at `url` (its index-relative `source` path, if known) is on the gold page.

    Path segments are compared, the shorter path being a suffix of the longer
    on segment boundaries: `https://docs.x.org/en/latest/guides/rng.html`
    matches `https://other.host/guides/rng.md` and the relative source
    `guides/rng.ipynb`, but not `guides/old_rng.html` nor `en/v2/guides/rng`.
    The relative source is what lets an index built without the gold's
    url_template (file:// URIs) still match. The price: a short relative path
    such as `index` matches every gold page of that name.
    """
    gold_path = page_path(gold)
    return any(_suffix_match(gold_path, page_path(candidate)) for candidate in (url, source) if candidate)


def same_section(gold: str, url: str, anchor: str, source: str | None = None) -> bool:
    """`same_page`, and the passage's anchor equals the gold's (a gold without an anchor is the whole page)."""
    wanted = anchor_of(gold)
    return same_page(gold, url, source) and (not wanted or unquote(anchor).strip().lower() == wanted)
