"""Signed folders: a keyed digest of every file, written beside them, checked before anything reads
them. What keeps a resume from running code planted in shared storage
(``pipelines.train.checkpoint``), and the key that signs.

``sign`` writes ``integrity/<manifest>.json`` (several writers of one folder write one manifest
each): for every file, HMAC-SHA256 over the folder's ``scope``, the file's path in the folder and
its SHA-256. ``verified_copy`` copies a folder to a private place, checking every file on the way,
so a shared folder changed after the check cannot slip a file in. A link, a pipe or a device, an
unreadable folder, a file without a matching digest (changed, added, moved from another scope, or
signed with another key) raises ``IntegrityError`` naming it, before anything is loaded.

The key never goes to the storage: ``PERCEIVER_CHECKPOINT_KEY``, else a key file created once per
user (``~/.config/perceiver/checkpoint.key``, readable by its owner only).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import stat
import tempfile
from pathlib import Path

from pipelines.errors import UserError

KEY_ENV = "PERCEIVER_CHECKPOINT_KEY"
INTEGRITY_DIR = "integrity"


class SigningError(UserError, RuntimeError):
    """The signing key cannot be read; the message says what to do."""


class IntegrityError(SigningError):
    """A file changed since it was signed, or signed with another key; the message names it."""


def checkpoint_key() -> bytes:
    """The secret that signs checkpoints: ``PERCEIVER_CHECKPOINT_KEY``, else this user's key file
    (created on first use, readable by its owner only). Resolve it once on the driver and hand it
    to the workers: every process that resumes a run must have the key that wrote it."""
    env = os.environ.get(KEY_ENV, "").strip()
    if env:
        return env.encode()
    folder = Path(os.environ.get("PERCEIVER_CONFIG_DIR", "~/.config/perceiver")).expanduser()
    path = folder / "checkpoint.key"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Written whole under another name, then linked into place: a process that finds the
        # file finds the whole key, and of two processes making one at once, the first wins.
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".checkpoint.key-")  # mode 0600
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    key = path.read_bytes().strip()
    if not key:
        raise SigningError(f"{path} is empty: delete it (a new key is made) or set {KEY_ENV}")
    return key


class FolderSigner:
    """Signs and verifies folders of one ``scope`` (a run and checkpoint name) with ``key``."""

    def __init__(self, key: bytes, scope: str) -> None:
        self.key, self.scope = key, scope

    def _mac(self, relpath: str, digest: str) -> str:
        message = f"{self.scope}\n{relpath}\n{digest}".encode()
        return hmac.new(self.key, message, hashlib.sha256).hexdigest()

    def sign(self, root: Path, manifest: str) -> None:
        """Digest every file under ``root`` into ``root/integrity/<manifest>.json``."""
        macs = {}
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            relpath = str(path.relative_to(root))
            macs[relpath] = self._mac(relpath, _copy_hashing(path, None))
        (root / INTEGRITY_DIR).mkdir(exist_ok=True)
        (root / INTEGRITY_DIR / f"{manifest}.json").write_text(json.dumps(macs))

    def verified_copy(self, src: Path, dst: Path, where: str) -> Path:
        """Copy ``src`` to ``dst``, checking every file against the digests of every manifest;
        ``where`` names ``src`` in errors (its URI)."""
        signed = _signed(src, where)
        dst.mkdir(parents=True)
        for folder, subfolders, files in os.walk(src, onerror=_raise):
            for name in [*subfolders, *files]:
                path = Path(folder) / name
                relpath = str(path.relative_to(src))
                mode = os.lstat(path).st_mode
                if stat.S_ISDIR(mode):
                    (dst / relpath).mkdir(parents=True)
                    continue
                if not stat.S_ISREG(mode):
                    raise IntegrityError(
                        f"{where}/{relpath}: not a regular file or folder (a link, a pipe or a "
                        "device); nothing was loaded"
                    )
                mac = self._mac(relpath, _copy_hashing(path, dst / relpath))
                if relpath.startswith(INTEGRITY_DIR + "/"):
                    continue  # read above; a forged entry matches no file
                if not any(hmac.compare_digest(mac, known) for known in signed.get(relpath, ())):
                    raise IntegrityError(
                        f"{where}/{relpath}: changed since it was written, or written with "
                        f"another key ({KEY_ENV}); the file may be malicious and nothing was loaded"
                    )
        return dst


def _signed(src: Path, where: str) -> dict[str, set[str]]:
    """Every manifest's digests: relative path -> the MACs some writer signed it with."""
    signed: dict[str, set[str]] = {}
    manifests = sorted((src / INTEGRITY_DIR).glob("*.json"))
    if not manifests:
        raise IntegrityError(
            f"{where}: no {INTEGRITY_DIR}/ digests, so its files cannot be trusted and were not "
            "loaded (a checkpoint of an older version, or not written by this code)"
        )
    for manifest in manifests:
        try:
            for relpath, mac in json.loads(manifest.read_text()).items():
                signed.setdefault(str(relpath), set()).add(str(mac))
        except (ValueError, AttributeError, OSError) as error:
            raise IntegrityError(
                f"{where}/{manifest.relative_to(src)}: unreadable digests ({error})"
            ) from None
    return signed


def _copy_hashing(path: Path, dest: Path | None) -> str:
    """The SHA-256 of a file, copying it to ``dest`` on the way (when given)."""
    digest = hashlib.sha256()
    with path.open("rb") as f, dest.open("wb") if dest else contextlib.nullcontext() as out:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
            if out is not None:
                out.write(chunk)
    return digest.hexdigest()


def _raise(error: OSError) -> None:
    raise IntegrityError(f"{error.filename}: cannot be read ({error.strerror})")
