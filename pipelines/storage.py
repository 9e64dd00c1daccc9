"""Storage: a local folder or an object-store URI (``s3://bucket/prefix``).

Everything a run keeps beside Ray Train's checkpoints (the data index, the best weights and
their pointer) and every output of batch inference is read and written here, through pyarrow's
filesystems, so local disks and object stores share one code path. ``FileSystem.from_uri`` is
used rather than the S3FileSystem constructor because it honours ``AWS_ENDPOINT_URL`` (an
S3-compatible server).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs


def resolve(storage_path: str, workdir: Path) -> str:
    """A storage path as an absolute local path or a URI; relative paths are from ``workdir``."""
    if "://" in storage_path:
        return storage_path.rstrip("/")
    path = Path(storage_path).expanduser()
    return str(path if path.is_absolute() else (workdir / path).resolve())


def is_remote(location: str) -> bool:
    return "://" in location


def filesystem(location: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """The pyarrow filesystem of a location, and the path inside it."""
    uri = location if is_remote(location) else str(Path(location).resolve())
    return pyarrow.fs.FileSystem.from_uri(uri)


def join(location: str, *parts: str) -> str:
    """``location/part/...`` for a local path or a URI alike."""
    return "/".join([location.rstrip("/"), *(part.strip("/") for part in parts)])


def read_text(location: str) -> str | None:
    """The file's text, or None when there is no such file."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_text(location: str, text: str) -> None:
    write_bytes(location, text.encode())


def write_bytes(location: str, data: bytes) -> None:
    """Write whole, so that a reader never sees part of the file: on a local disk to a temporary
    name, then moved over the target; an object store makes an object visible only once its
    upload is complete."""
    fs, path = filesystem(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    if is_remote(location):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    with fs.open_output_stream(f"{path}.tmp") as f:
        f.write(data)
    fs.move(f"{path}.tmp", path)


def upload(local: Path, location: str) -> None:
    """Copy the local folder ``local`` to ``location`` (created)."""
    fs, path = filesystem(location)
    fs.create_dir(path, recursive=True)
    pyarrow.fs.copy_files(str(local), path, pyarrow.fs.LocalFileSystem(), fs)


def local_copy(location: str, scratch: Path) -> Path:
    """A local path with the folder's files: the folder itself when it is local, else a download
    into ``scratch``."""
    if not is_remote(location):
        return Path(location)
    fs, path = filesystem(location)
    local = scratch / path.rstrip("/").rsplit("/", 1)[-1]
    local.mkdir(parents=True, exist_ok=True)  # pyarrow creates no local folders
    pyarrow.fs.copy_files(path, str(local), fs, pyarrow.fs.LocalFileSystem())
    return local
