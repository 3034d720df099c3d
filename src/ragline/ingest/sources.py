"""Where the files of a source come from: a local folder, or an object-store prefix through fsspec (s3://…).

A `Source` lists its entries — each with its path relative to the source,
its size and a change stamp (a file's mtime, an object's ETag), or why it is
skipped — and reads one entry's bytes, refusing one over the size limit
before downloading it. The indexer needs nothing else, so the incremental
manifest, deletions and the engines work the same on every kind of source;
`ragline watch` polls `list_entries` for the stamps. A source that cannot be
listed (a missing folder or bucket, an endpoint that cannot be reached) raises
`SourceError`: never an empty listing, which would delete what was indexed.

Excludes and secret patterns apply to object keys as to files, on every
folder of the key as on its name. Object sources have no local root, so the
includes of docs pages (reST `include`, MyST `{include}`) are not resolved
there: they become notes, and nothing local is ever read for them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from pydantic import SecretStr

from ragline.config import IngestSettings, SourceSettings
from ragline.ingest.loaders.base import LoadError
from ragline.ingest.scan import first_match, printable, scan

OBJECT_STORE_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
EXTRAS = {"s3fs": "ragline[s3]"}


class SourceError(RuntimeError):
    """A source cannot be listed or read at all (as opposed to one bad file): the run stops, nothing is deleted."""


@dataclass(frozen=True, slots=True)
class Entry:
    """A file of a source, or an object under its prefix; `skipped` says why it is left out, `error` why it cannot be
    read (each reported, the others indexed)."""

    relative: str
    """Its posix path from the source root, printable: with the source's label, the document's identity."""
    location: str
    """Where it is, printable: the absolute path of a file, the URL of an object (the manifest's `source`)."""
    size: int = 0
    version: int = 0
    """What changes when its content does, as a 63-bit integer (the manifest's `mtime_ns`): a file's mtime in
    nanoseconds, a hash of an object's ETag (or its last-modified time where there is none)."""
    stamp: str = ""
    """The same in words: "size:mtime_ns" of a file, the ETag of an object."""
    skipped: str = ""
    error: str = ""
    path: Path | None = None
    """The local file (None for an object)."""


class Source(Protocol):
    """A place files are indexed from."""

    label: str
    """The source's identity (`SourceSettings.label`)."""
    root: str
    """The folder (or file) resolved, or the URL of the prefix, printable: the manifest's `root`."""
    local_root: Path | None
    """The folder the includes of a docs page are read from; None where there is none (an object store)."""
    within: str
    """The part of the source being synced, as a posix path from its root ("": all of it)."""

    def entries(self) -> Iterator[Entry]:
        """The entries in a stable order; raises SourceError when the source cannot be listed."""
        ...

    def read(self, entry: Entry, max_mb: float) -> bytes:
        """An entry's bytes; LoadError when this entry cannot be read (over `max_mb`, gone), SourceError when
        the source itself cannot be reached (the run stops: a re-run goes on from there)."""
        ...

    def default_url(self, entry: Entry) -> str:
        """The public URL of an entry when the source has no url_template: a file:// URI, the object's URL."""
        ...

    def holds(self, location: str) -> bool:
        """Whether a manifest `source` lies in the synced part of this source (files gone from it are deleted)."""
        ...


def check_size(size: int, max_mb: float) -> None:
    if size > int(max_mb * 1024 * 1024):
        raise LoadError(f"file is {size / 1048576:.1f} MB, over the {max_mb:g} MB limit (ingest.max_file_mb)")
    if size == 0:
        raise LoadError("empty file")


def stamp_version(stamp: str) -> int:
    """A stamp as a positive 63-bit integer (what the manifest's integer column holds)."""
    return int.from_bytes(hashlib.sha256(stamp.encode()).digest()[:8], "big") >> 1


def is_under(location: str, root: str, sep: str = os.sep) -> bool:
    return location == root or location.startswith(root.rstrip(sep) + sep)


def relative_in(location: str, root: str) -> str:
    """The path of a manifest `source` from its `root` (a single-file source: the file's name)."""
    sep = "/" if "://" in root else os.sep
    if location == root:
        return location.rstrip(sep).rsplit(sep, 1)[-1]
    return location[len(root.rstrip(sep)) + 1:].replace(os.sep, "/")


class LocalSource:
    """A folder (or one file) on this machine: `scan`, with each file's size and mtime."""

    def __init__(self, settings: SourceSettings, ingest: IngestSettings) -> None:
        self.settings = settings
        self.ingest = ingest
        self.label = settings.label
        self.path = settings.local_path.expanduser().resolve()
        self.root = printable(self.path)
        self.local_root = self.path
        self.start = self.path / settings._within if settings._within else self.path
        self.within = printable(self.start.relative_to(self.path).as_posix()) if settings._within else ""

    def entries(self) -> Iterator[Entry]:
        if not self.path.exists() or not self.start.exists():
            shown = self.settings.path if not self.settings._within else self.start
            raise SourceError(f"{shown} does not exist; check the path (nothing was changed)")
        prefix = self.within
        for found in scan(self.start, self.ingest.exclude, self.ingest.exclude_secrets):
            if not prefix:
                relative = found.relative
            else:  # a part of the folder: paths from the folder's root all the same
                relative = prefix if self.start.is_file() else f"{prefix}/{found.relative}"
            location = printable(found.path)
            if found.skipped:
                yield Entry(relative, location, skipped=found.skipped, path=found.path)
                continue
            try:
                info = found.path.stat()
            except OSError as exc:
                yield Entry(relative, location, error=f"cannot read: {exc.strerror}", path=found.path)
                continue
            yield Entry(relative, location, info.st_size, info.st_mtime_ns, f"{info.st_size}:{info.st_mtime_ns}",
                        path=found.path)

    def read(self, entry: Entry, max_mb: float) -> bytes:
        assert entry.path is not None
        check_size(entry.size, max_mb)
        try:
            return entry.path.read_bytes()
        except OSError as exc:
            raise LoadError(f"cannot read: {exc.strerror}") from exc

    def default_url(self, entry: Entry) -> str:
        assert entry.path is not None
        return entry.path.as_uri()

    def holds(self, location: str) -> bool:
        return is_under(location, printable(self.start))


class ObjectSource:
    """Objects under a prefix of an object store, through fsspec (s3://bucket/prefix: AWS S3, MinIO, R2…)."""

    def __init__(self, settings: SourceSettings, ingest: IngestSettings) -> None:
        assert isinstance(settings.path, str)
        self.settings = settings
        self.ingest = ingest
        self.label = settings.label
        self.protocol, _, rest = settings.path.partition("://")
        self.protocol = self.protocol.lower()
        self.prefix = rest.strip("/")
        self.root = f"{self.protocol}://{self.prefix}"
        self.local_root = None
        self.within = settings._within.strip("/")
        self.start = f"{self.prefix}/{self.within}" if self.within else self.prefix
        self.fs = filesystem(self.protocol, settings.storage_options)

    def url_of(self, key: str) -> str:
        return f"{self.protocol}://{key}"

    def entries(self) -> Iterator[Entry]:
        listing = self._list()
        reported: set[str] = set()
        for key in sorted(listing):
            info = listing[key]
            if key.endswith("/") or info.get("type", "file") != "file":
                continue  # a folder marker
            relative = key[len(self.prefix) + 1:] if key != self.prefix else key.rsplit("/", 1)[-1]
            location = self.url_of(key)
            reason = self._left_out(relative, reported)
            if reason is None:
                continue
            if reason:
                yield Entry(relative, location, skipped=reason)
                continue
            stamp = object_stamp(info)
            yield Entry(relative, location, int(info.get("size") or 0), stamp_version(stamp), stamp)

    def _list(self) -> dict[str, dict[str, Any]]:
        try:
            self.fs.invalidate_cache()
            listing = self.fs.find(self.start, detail=True, withdirs=False)
        except FileNotFoundError as exc:
            raise SourceError(f"{self.url_of(self.start)}: {exc.strerror or exc} (no such bucket?); check the path "
                              "(nothing was changed)") from exc
        except PermissionError as exc:
            raise SourceError(f"{self.url_of(self.start)}: access denied ({exc}); check the credentials "
                              "(storage_options or the environment; nothing was changed)") from exc
        except Exception as exc:
            raise SourceError(f"cannot list {self.url_of(self.start)}: {unreachable(exc) or exc}; check "
                              f"{self.endpoint()} and the credentials (nothing was changed)") from exc
        if not listing:
            raise SourceError(f"no objects under {self.url_of(self.start)}; check the path (nothing was changed: "
                              "an empty prefix never deletes what was indexed from it)")
        return listing

    def endpoint(self) -> str:
        options = self.settings.storage_options
        return str(options.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL") or "the endpoint")

    def _left_out(self, relative: str, reported: set[str]) -> str | None:
        """"" to index it, a reason to report it skipped, None to leave it out silently (an exclude, or a folder
        already reported) — as `scan` does for a folder's files."""
        parts = relative.split("/")
        if any(part in ("", ".", "..") for part in parts):
            return "key has an empty, '.' or '..' part: no folder could hold it as a file (not indexed)"
        exclude, secrets = self.ingest.exclude, self.ingest.exclude_secrets
        for depth in range(1, len(parts)):
            folder, name = "/".join(parts[:depth]), parts[depth - 1]
            if first_match(folder, name, exclude):
                return None
            if pattern := first_match(folder, name, secrets):
                if folder in reported:
                    return None
                reported.add(folder)
                return f"name matches ingest.exclude_secrets {pattern!r}"
        if pattern := first_match(relative, parts[-1], secrets):
            return f"name matches ingest.exclude_secrets {pattern!r}"
        return None if first_match(relative, parts[-1], exclude) else ""

    def read(self, entry: Entry, max_mb: float) -> bytes:
        check_size(entry.size, max_mb)  # before downloading it
        key = entry.location.split("://", 1)[1]
        try:
            data = self.fs.cat_file(key, start=0, end=int(max_mb * 1024 * 1024) + 1)
        except FileNotFoundError as exc:
            raise LoadError("the object is gone (deleted since it was listed)") from exc
        except PermissionError as exc:
            raise LoadError(f"access denied: {exc}") from exc
        except Exception as exc:
            if reason := unreachable(exc):
                raise SourceError(f"cannot read {entry.location}: {reason}; the files written so far are kept: "
                                  "re-run when the object store is back") from exc
            raise LoadError(f"cannot read: {exc}") from exc
        check_size(len(data), max_mb)  # it grew (or emptied) since it was listed
        return data

    def default_url(self, entry: Entry) -> str:
        return f"{self.protocol}://{quote(entry.location.split('://', 1)[1])}"

    def holds(self, location: str) -> bool:
        return is_under(location, self.url_of(self.start), "/")


def object_stamp(info: dict[str, Any]) -> str:
    """What changes with an object's content: its ETag (or an equivalent), else its size and last-modified time."""
    for key in ("ETag", "etag", "md5Hash", "generation", "content_md5"):
        if info.get(key):
            return str(info[key]).strip('"')
    modified = info.get("LastModified") or info.get("last_modified") or info.get("mtime") or info.get("updated")
    return f"{info.get('size')}:{modified}"


def unreachable(exc: BaseException) -> str:
    """The words for an exception (or one it came from) that says the endpoint cannot be reached, else ""."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        name = type(current).__name__
        if isinstance(current, (ConnectionError, TimeoutError)) or "Connect" in name or "Timeout" in name:
            return str(current) or name
        current = current.__cause__ or current.__context__
    return ""


def storage_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    """fsspec's options from a source's `storage_options`: secrets unmasked, `region` as the client's region."""
    kwargs = {key: value.get_secret_value() if isinstance(value, SecretStr) else value for key, value in options.items()}
    if "region" in kwargs:
        region = kwargs.pop("region")
        kwargs["client_kwargs"] = {"region_name": region, **(kwargs.get("client_kwargs") or {})}
    return kwargs


def filesystem(protocol: str, options: dict[str, Any]) -> Any:
    """A fresh fsspec filesystem (no cached instance or listing: each run sees the store as it is now)."""
    try:
        import fsspec
    except ImportError as exc:
        raise SourceError(f"{protocol}:// sources need fsspec: pip install 'ragline[s3]'") from exc
    kwargs = {"skip_instance_cache": True, "use_listings_cache": False, **storage_kwargs(options)}
    try:
        return fsspec.filesystem(protocol, **kwargs)
    except (ImportError, ValueError) as exc:
        package = OBJECT_STORE_PACKAGES.get(protocol)
        if isinstance(exc, ImportError) or package:
            install = EXTRAS.get(package or "", package or f"the fsspec package for {protocol}://")
            raise SourceError(f"{protocol}:// sources need {package or 'an fsspec implementation'}: pip install "
                              f"'{install}' ({exc})") from exc
        raise SourceError(f"{protocol}:// is not a storage fsspec knows: {exc}") from exc
    except TypeError as exc:
        raise SourceError(f"bad storage_options for {protocol}://: {exc}") from exc


def open_source(settings: SourceSettings, ingest: IngestSettings) -> Source:
    """The source a `SourceSettings` names; SourceError when its kind of storage is not installed."""
    return ObjectSource(settings, ingest) if settings.is_remote else LocalSource(settings, ingest)


def list_entries(settings: SourceSettings, ingest: IngestSettings) -> list[Entry]:
    """A source's entries with their stamps, as the indexer sees them (for pollers such as `ragline watch`);
    raises SourceError when the source cannot be listed."""
    return list(open_source(settings, ingest).entries())


def explicit_source(path: str, url_template: str | None, configured: list[SourceSettings]) -> SourceSettings:
    """A path (or URL) given by hand as a source. Inside a configured source, it is that source synced only there:
    its documents keep their identity (label and path from the source's root), tenant, groups, URL template
    (unless one is given) and storage options; elsewhere, a source of its own for everyone in the default tenant."""
    given = SourceSettings(path=path, url_template=url_template)
    where = location_of(given)
    holders = [(source, location_of(source)) for source in configured if source.is_remote == given.is_remote]
    holders = [(source, root) for source, root in holders if is_under(where, root, "/" if given.is_remote else os.sep)]
    if not holders:
        return given
    owner, root = max(holders, key=lambda held: len(held[1]))
    update: dict[str, Any] = {} if url_template is None else {"url_template": url_template}
    chosen = owner.model_copy(update=update)
    if where != root:
        if given.is_remote:
            chosen._within = where[len(root) + 1:]
        else:
            resolved = given.local_path.expanduser().resolve()
            chosen._within = str(resolved.relative_to(owner.local_path.expanduser().resolve()))
    return chosen


def location_of(settings: SourceSettings) -> str:
    """A source's root as the manifest writes it: the resolved folder, or the URL without a trailing `/`."""
    if settings.is_remote:
        scheme, _, rest = str(settings.path).partition("://")
        return f"{scheme.lower()}://{rest.strip('/')}"
    return printable(settings.local_path.expanduser().resolve())
