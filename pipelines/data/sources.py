"""Where documents come from: Hub datasets, S3 and local paths, resolved to sorted file lists.

A source names either a Hub dataset (``hf://datasets/allenai/c4`` plus a config such as ``en``) or
files (a local path, directory or glob, or an ``s3://`` URL). Hub datasets are read through their
shard files with ``huggingface_hub.HfFileSystem`` (never the Hub's dataset API), so reading is
parallel by file and works with a local mirror: with ``data_dir`` set, ``hf://datasets/ORG/NAME``
maps to ``DATA_DIR/NAME`` and everything after that (the glob, the readers, the sample ids, which
use paths relative to the dataset root) is the same code with another filesystem.

File lists are sorted, so the order of files, and with it every position in the crop stream,
depends on the file names only, not on the order a filesystem lists them in.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import fsspec
import pyarrow.fs
from fsspec.implementations.arrow import ArrowFSWrapper

from pipelines.errors import UserError

Format = Literal["auto", "parquet", "json", "text"]

HUB_PREFIX = "hf://datasets/"

# Shard globs of the Hub datasets this project reads, relative to the dataset root. "{config}" is
# the Hub config (a folder on the Hub) and "{split}" the Hub split. Several patterns are tried in
# order and the first that matches wins: the second ones match the local mirror in ../shared/data,
# whose IMDB and GLUE files are named "train.parquet" rather than "train-00000-of-00001.parquet".
HUB_LAYOUTS: dict[str, tuple[str, ...]] = {
    "wikimedia/wikipedia": ("{config}/{split}-*.parquet",),
    "allenai/c4": ("{config}/c4-{split}.*.json.gz",),
    "stanfordnlp/imdb": ("{config}/{split}-*.parquet", "{split}.parquet"),
    "nyu-mll/glue": ("{config}/{split}-*.parquet", "{config}/{split}.parquet"),
}

_SUFFIX_FORMATS = {
    ".parquet": "parquet",
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".txt": "text",
    ".text": "text",
}
_GLOB_CHARS = frozenset("*?[")


@dataclass
class SourceConfig:
    """One corpus of the pretraining mixture.

    name: short label used in counters, logs and sample ids (so renaming a source changes its masks).
    path: ``hf://datasets/ORG/NAME`` for a Hub dataset, or a local/``s3://`` file, folder or glob.
    config: Hub config, the dataset's sub-folder (``en`` for C4, ``20231101.en`` for Wikipedia);
        substituted for ``{config}`` in the shard glob.
    hub_split: the Hub split whose shards are read (``train``); substituted for ``{split}``. This is
        not the held-out validation split, which is carved out of these documents by hash.
    files: glob relative to ``path`` (default: the known layout of the Hub dataset, or every
        readable file under a folder). Overrides the known layout.
    format: ``auto`` picks by extension (.parquet, .json/.jsonl/.ndjson, .txt, each optionally .gz).
    text_column: column holding the document (string or binary; binary bytes are kept as they are).
    sample_by: for text files: a document per ``line``, per blank-line ``paragraph``, or the whole
        ``document`` (the choices of HF's ``text`` loader).
    weight: share of the mixture's training bytes (normalised over the sources).
    max_files: read only the first N files of the sorted list (quick checks, tests); None = all.
    """

    name: str = "c4"
    path: str = "hf://datasets/allenai/c4"
    config: str | None = "en"
    hub_split: str = "train"
    files: str | None = None
    format: Format = "auto"
    text_column: str = "text"
    sample_by: Literal["line", "paragraph", "document"] = "line"
    weight: float = 1.0
    max_files: int | None = None

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a non-empty label without '/', got {self.name!r}")
        if not self.path:
            raise ValueError("path must be set")
        if self.format not in ("auto", "parquet", "json", "text"):
            raise ValueError(f"format must be auto, parquet, json or text, got {self.format!r}")
        if self.sample_by not in ("line", "paragraph", "document"):
            raise ValueError(
                f"sample_by must be line, paragraph or document, got {self.sample_by!r}"
            )
        if not self.text_column:
            raise ValueError("text_column must be a non-empty column name")
        if not (isinstance(self.weight, (int, float)) and self.weight > 0):
            raise ValueError(f"weight must be a positive number, got {self.weight!r}")
        if self.max_files is not None and self.max_files < 1:
            raise ValueError(
                f"max_files must be a positive integer or null, got {self.max_files!r}"
            )


def default_sources() -> list[SourceConfig]:
    """The paper's mixture: C4 ``en`` for 70% and English Wikipedia for 30% of training bytes."""
    return [
        SourceConfig(name="c4", path="hf://datasets/allenai/c4", config="en", weight=0.7),
        SourceConfig(
            name="wikipedia",
            path="hf://datasets/wikimedia/wikipedia",
            config="20231101.en",
            weight=0.3,
        ),
    ]


@dataclass(frozen=True)
class FileRef:
    """One file of a source: its URL, its path relative to the source root, size and version.

    ``relpath`` is the same for the Hub and for a mirror with the Hub's layout, which is why sample
    ids (and so masks) are computed from it rather than from the URL. ``version`` is whatever the
    filesystem offers to notice a changed file (Hub blob id, S3 ETag, local mtime).
    """

    url: str
    relpath: str
    format: str
    size: int
    version: str


def files_digest(refs: Iterable[FileRef], *extra: str) -> str:
    """A short digest of files (names, sizes, versions) and any ``extra`` settings that decide what
    is read from them: equal digests mean the same data."""
    text = "|".join(f"{r.relpath}:{r.size}:{r.version}" for r in refs) + "|" + "|".join(extra)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def hub_repo(path: str) -> str | None:
    """``ORG/NAME`` of a ``hf://datasets/ORG/NAME[@rev][/...]`` path, else None."""
    if not path.startswith(HUB_PREFIX):
        return None
    parts = path[len(HUB_PREFIX) :].split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ValueError(f"a Hub path needs the form hf://datasets/ORG/NAME, got {path!r}")
    return f"{parts[0]}/{parts[1].split('@', 1)[0]}"


def resolve_root(path: str, data_dir: str | None) -> str:
    """The URL files are listed under: the Hub path, or its mirror ``DATA_DIR/NAME/...``."""
    repo = hub_repo(path)
    if repo is None or data_dir is None:
        return path.rstrip("/") if not _has_glob(path) else path
    rest = path[len(HUB_PREFIX) :].split("/", 2)[2:]  # anything below the repository root
    base = data_dir.rstrip("/") if "://" in data_dir else os.path.abspath(data_dir)
    return posixpath.join(base, repo.split("/")[1], *rest).rstrip("/")


def patterns_for(source_path: str, config: str | None, split: str, files: str | None) -> list[str]:
    """Globs (relative to the root) to try in order; ``[]`` means the root is itself the glob."""
    if files is not None:
        return [files.format(config=config or "", split=split)]
    if _has_glob(source_path):
        return []
    repo = hub_repo(source_path)
    if repo is not None:
        if repo not in HUB_LAYOUTS:
            raise ValueError(
                f"no known shard layout for Hub dataset {repo!r}: set files (e.g. "
                f"'{{config}}/{{split}}-*.parquet'); known: {sorted(HUB_LAYOUTS)}"
            )
        if config is None and any("{config}" in p for p in HUB_LAYOUTS[repo]):
            raise ValueError(f"Hub dataset {repo!r} needs config (a sub-folder of the dataset)")
        return [p.format(config=config or "", split=split) for p in HUB_LAYOUTS[repo]]
    return ["**"]  # a folder or a single file: everything readable under it


def detect_format(relpath: str, declared: str = "auto") -> str:
    """The reader for a file: ``declared`` unless ``auto``, else from the extension."""
    if declared != "auto":
        return declared
    name = relpath.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    fmt = _SUFFIX_FORMATS.get(posixpath.splitext(name)[1])
    if fmt is None:
        raise ValueError(
            f"cannot tell the format of {relpath!r} from its extension "
            f"(known: {sorted(_SUFFIX_FORMATS)}, optionally .gz); set format explicitly"
        )
    return fmt


class NoDataFilesError(UserError, FileNotFoundError):
    """A source whose path, folder or glob holds no data file."""


def list_files(
    path: str,
    *,
    config: str | None = None,
    split: str = "train",
    files: str | None = None,
    format: str = "auto",
    data_dir: str | None = None,
    max_files: int | None = None,
) -> list[FileRef]:
    """Sorted files of a source: one listing call per pattern, no file is opened."""
    root = resolve_root(path, data_dir)
    fs, root_path = filesystem(root)
    patterns = patterns_for(path, config, split, files)
    found: dict[str, dict[str, Any]] = {}
    tried = []
    for pattern in patterns or [""]:
        full = posixpath.join(root_path, pattern) if pattern else root_path
        tried.append(full)
        if pattern == "**" and fs.isfile(root_path):
            found = {root_path: fs.info(root_path)}
        else:
            found = _glob(fs, full)
        if pattern == "**":  # folder mode: keep files whose format is known or declared
            found = {p: i for p, i in found.items() if format != "auto" or _known_suffix(p)}
        if found:
            break
    if not found:
        raise NoDataFilesError(
            f"{path}: no data files: nothing matches {' or '.join(map(repr, tried))} (a folder "
            "is read for .parquet, .json/.jsonl/.ndjson and .txt files, each optionally .gz; "
            "set files: or format: for other names)"
        )
    base = root_path if patterns else _glob_base(root_path)
    refs = []
    for p in sorted(found):
        rel = posixpath.relpath(p, base) if p != base else posixpath.basename(p)
        info = found[p]
        refs.append(
            FileRef(
                url=_url(root, p),
                relpath=rel,
                format=detect_format(rel, format),
                size=int(info.get("size") or 0),
                version=_version(info),
            )
        )
    return refs[:max_files] if max_files else refs


def _glob(fs: fsspec.AbstractFileSystem, pattern: str) -> dict[str, dict[str, Any]]:
    if not _has_glob(pattern):
        return {pattern: fs.info(pattern)} if fs.exists(pattern) and fs.isfile(pattern) else {}
    hits = fs.glob(pattern, detail=True)
    return {p: i for p, i in hits.items() if i.get("type", "file") == "file"}


def _glob_base(pattern: str) -> str:
    """The longest folder of a glob that contains no wildcard: relative paths start there."""
    parts = pattern.split("/")
    for i, part in enumerate(parts):
        if _has_glob(part):
            return "/".join(parts[:i])
    return posixpath.dirname(pattern)


def _known_suffix(path: str) -> bool:
    try:
        detect_format(path)
    except ValueError:
        return False
    return True


def _has_glob(path: str) -> bool:
    return any(c in _GLOB_CHARS for c in path)


def _version(info: dict[str, Any]) -> str:
    for key in ("blob_id", "ETag", "etag", "mtime", "LastModified"):
        if info.get(key) is not None:
            return str(info[key])
    return ""


def _url(root: str, path: str) -> str:
    """Turn a filesystem path back into a URL with the root's protocol."""
    protocol = root.split("://", 1)[0] if "://" in root else None
    return f"{protocol}://{path}" if protocol else path


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """An fsspec filesystem for a URL and the path inside it.

    ``hf://`` is ``huggingface_hub.HfFileSystem`` (token from ``HF_TOKEN``); ``s3://`` is pyarrow's
    S3 client behind fsspec's wrapper (credentials, region and ``AWS_ENDPOINT_URL`` from the usual
    AWS variables); anything else is fsspec's own resolution (local paths).
    """
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    fs = _filesystem_for_protocol(protocol)
    if "://" not in url:
        return fs, os.path.abspath(url)
    if protocol == "s3":  # pyarrow paths are "bucket/key", no protocol
        return fs, url.split("://", 1)[1]
    return fs, fs._strip_protocol(url)  # the filesystem's own canonical form of the path


@functools.cache
def _filesystem_for_protocol(protocol: str) -> fsspec.AbstractFileSystem:
    # One instance per process and protocol: Ray workers reuse it across tasks, which keeps the
    # Hub's and S3's connection pools and directory caches warm.
    if protocol == "s3":
        return ArrowFSWrapper(s3_filesystem())
    return fsspec.filesystem(protocol)


def s3_filesystem() -> pyarrow.fs.S3FileSystem:
    """pyarrow's S3 client, pointed at ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` when set (an
    S3-compatible server). The constructor ignores those variables, unlike the AWS SDKs, and would
    ask the public S3 host; ``FileSystem.from_uri`` needs a bucket in the URI."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return pyarrow.fs.S3FileSystem(endpoint_override=endpoint or None)


# Object-store reads go through a read-ahead buffer this large: without it the gzip and JSON
# readers' small reads each become a ranged GET (317 for one read of the 0.9 MB C4 sample shard,
# against one with the buffer), which costs far more in latency than the memory.
REMOTE_READ_AHEAD = 8 << 20


def open_binary(url: str) -> Any:
    """A binary, seekable file object for a URL (the caller closes it)."""
    fs, path = filesystem(url)
    if isinstance(fs, ArrowFSWrapper):
        return io.BufferedReader(fs.fs.open_input_file(path), buffer_size=REMOTE_READ_AHEAD)
    return fs.open(path, "rb")
