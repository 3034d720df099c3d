"""Dev corpora of documentation *sources*, fetched from their PyPI sdists.

    python benchmarks/corpora.py flax [--cache-dir DIR]

Prints the docs folder and the url_template to ingest it with, e.g.
`SourceSettings(path=corpus.path, url_template=corpus.url_template)`.

The sdist is fetched with `pip download` into the cache (default
~/.cache/ragline/corpora) and its docs folder is unpacked once; later calls
reuse both. Where a page exists in several source formats (jupytext pairs
`x.ipynb` + `x.md`), only the file Sphinx builds is kept — the first suffix in
the project's `source_suffix` — so that each published page is indexed once.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE = Path.home() / ".cache" / "ragline" / "corpora"


@dataclass(frozen=True)
class CorpusSpec:
    dist: str
    version: str
    docs_dir: str  # the folder inside the sdist that the published site is built from
    url_template: str
    source_suffix: tuple[str, ...]  # from the project's conf.py, in Sphinx's order of preference
    license: str


@dataclass(frozen=True)
class Corpus:
    path: Path
    url_template: str


SPECS = {
    # docs_nnx/ is the site at flax.readthedocs.io (docs/ is the deprecated Linen site,
    # flax-linen.readthedocs.io); docs_nnx/conf.py: source_suffix = ['.rst', '.ipynb', '.md'].
    "flax": CorpusSpec(
        dist="flax",
        version="0.12.12",
        docs_dir="docs_nnx",
        url_template="https://flax.readthedocs.io/en/latest/{path}.html",
        source_suffix=(".rst", ".ipynb", ".md"),
        license="Apache-2.0",
    ),
}


def fetch(name: str, cache_dir: Path = DEFAULT_CACHE) -> Corpus:
    """The unpacked docs folder of corpus `name`, downloading and unpacking it on first use."""
    try:
        spec = SPECS[name]
    except KeyError:
        raise SystemExit(f"unknown corpus {name!r}; known: {', '.join(sorted(SPECS))}") from None
    target = cache_dir / f"{spec.dist}-{spec.version}" / spec.docs_dir
    if not target.is_dir():
        sdist = _download(spec, cache_dir / "sdists")
        _unpack(spec, sdist, target)
    return Corpus(path=target, url_template=spec.url_template)


def _download(spec: CorpusSpec, into: Path) -> Path:
    found = sorted(into.glob(f"{spec.dist}-{spec.version}.tar.gz"))
    if found:
        return found[0]
    into.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "--python-version", "3.12", f"{spec.dist}=={spec.version}", "-d", str(into),
    ]  # fmt: skip
    print(f"downloading the {spec.dist} {spec.version} sdist from PyPI...", file=sys.stderr)
    try:
        done = subprocess.run(command, capture_output=True, text=True)
    except OSError as error:
        raise SystemExit(f"could not run pip ({error}); install pip for {sys.executable}") from None
    found = sorted(into.glob(f"{spec.dist}-{spec.version}.tar.gz"))
    if done.returncode != 0 or not found:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise SystemExit(
            f"pip could not download {spec.dist}=={spec.version} from PyPI:\n{tail}\n"
            f"Check network access to PyPI (or pip's index settings), or place "
            f"{spec.dist}-{spec.version}.tar.gz in {into} yourself."
        )
    return found[0]


def _unpack(spec: CorpusSpec, sdist: Path, target: Path) -> None:
    """Extract the docs folder into a temporary sibling, then rename: a half-done unpack is never reused."""
    prefix = f"{spec.dist}-{spec.version}/{spec.docs_dir}/"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp, tarfile.open(sdist) as archive:
        members = [
            m for m in archive.getmembers() if m.name.startswith(prefix) and not (m.issym() or m.islnk())
        ]
        if not members:
            raise SystemExit(f"{sdist} has no {spec.docs_dir}/ folder: fix its spec in benchmarks/corpora.py")
        archive.extractall(tmp, members=members, filter="data")
        docs = Path(tmp) / prefix
        _keep_built_sources(docs, spec.source_suffix)
        docs.rename(target)


def _keep_built_sources(docs: Path, source_suffix: tuple[str, ...]) -> None:
    """Delete the source files Sphinx ignores because the same page exists in a preferred format."""
    for path in sorted(docs.rglob("*")):
        if path.suffix not in source_suffix or not path.is_file():
            continue
        preferred = source_suffix[: source_suffix.index(path.suffix)]
        if any(path.with_suffix(suffix).is_file() for suffix in preferred):
            path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(SPECS))
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args()
    corpus = fetch(args.name, args.cache_dir)
    print(f"path: {corpus.path}")
    print(f"url_template: {corpus.url_template}")


if __name__ == "__main__":
    main()
