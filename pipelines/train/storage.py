"""Run storage: a local folder or an object-store URI (``s3://bucket/prefix``).

Everything a run keeps beside Ray Train's checkpoints (the data index, the best weights and
their pointer) is read and written here, through pyarrow's filesystems, so local
disks and object stores share one code path. ``FileSystem.from_uri`` is used rather than the
S3FileSystem constructor because it honours ``AWS_ENDPOINT_URL`` (an S3-compatible server).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.fs


def resolve(storage_path: str, workdir: Path) -> str:
    """A storage path as an absolute local path or a URI; relative paths are from ``workdir``."""
    if "://" in storage_path:
        return storage_path.rstrip("/")
    path = Path(storage_path).expanduser()
    return str(path if path.is_absolute() else (workdir / path).resolve())


def is_remote(location: str) -> bool:
    return "://" in location


def _fs(location: str) -> tuple[Any, str]:
    uri = location if is_remote(location) else str(Path(location).resolve())
    return pyarrow.fs.FileSystem.from_uri(uri)


def read_text(location: str) -> str | None:
    """The file's text, or None when there is no such file."""
    fs, path = _fs(location)
    if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_text(location: str, text: str) -> None:
    """Write whole: to a temporary name, then moved over the target (atomic on local disks; an
    object store writes whole objects anyway)."""
    fs, path = _fs(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(f"{path}.tmp") as f:
        f.write(text.encode())
    fs.move(f"{path}.tmp", path)


def upload(local: Path, location: str) -> None:
    """Copy the local folder ``local`` to ``location`` (created)."""
    fs, path = _fs(location)
    fs.create_dir(path, recursive=True)
    pyarrow.fs.copy_files(str(local), path, pyarrow.fs.LocalFileSystem(), fs)


def local_copy(location: str, scratch: Path) -> Path:
    """A local path with the folder's files: the folder itself when it is local, else a download
    into ``scratch``."""
    if not is_remote(location):
        return Path(location)
    fs, path = _fs(location)
    local = scratch / path.rstrip("/").rsplit("/", 1)[-1]
    local.mkdir(parents=True, exist_ok=True)  # pyarrow creates no local folders
    pyarrow.fs.copy_files(path, str(local), fs, pyarrow.fs.LocalFileSystem())
    return local
