"""Checkpoints: the one component that writes, reports, verifies and reads them, for every task.

Layout of a checkpoint (one folder in Ray Train's storage, merged from every rank's files):

    state.json                 rank 0: format version, step, the core's and the task's state
    rng/rank_00000.json        each rank: torch, CUDA, NumPy and Python RNG states
    engine/step_00000120/      each rank's engine files (DeepSpeed: model, optimizer and schedule
                               state, ZeRO shards per rank; DDP: one file per rank)
    hf/                        export checkpoints only: the consolidated fp32 weights in
                               perceiver_core's Hugging Face format (config.json, model.safetensors)
    integrity/rank_00000.json  each rank: a keyed digest of every file it wrote

Every rank writes its part into a local temporary folder and calls ``ray.train.report`` with it;
Ray Train uploads and merges the parts (a local path or s3://). On resume every rank verifies the
whole folder, then loads the engine state into a freshly built engine and its RNG state (a rank
the checkpoint lacks keeps its fresh seed).

Nothing a resume reads can run code planted in the storage, which a whole cluster shares and
RayJob retries resume from automatically. State and RNG states are JSON. The engine's files are
pickles (DeepSpeed opens them with ``torch.load(weights_only=False)``), so every rank signs what it
wrote and a resume verifies every file before anything is opened (``pipelines.signing``: keyed by
a secret that never goes to the storage, over the run name, the checkpoint's folder name and the
file's path, so files cannot be moved between checkpoints or runs either). A file that was
changed, added, or written with another key stops the resume with ``IntegrityError`` naming it.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import torch

from pipelines.errors import UserError
from pipelines.signing import FolderSigner

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
STATE_FILE = "state.json"
ENGINE_DIR = "engine"
RNG_DIR = "rng"
HF_DIR = "hf"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the file."""


@dataclass(frozen=True)
class TrainState:
    """What besides the engine's state a resumed run needs.

    progress: the training core's (evaluations, best score and step, evaluations without
        improvement, stopped early); task: the task's own (the data position of a stream).
    """

    step: int
    run_id: str
    config_hash: str
    world_size: int
    progress: dict[str, Any] = field(default_factory=dict)
    task: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"format_version": FORMAT_VERSION, **asdict(self)}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        data = json.loads(text)
        version = data.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint format {version} is not {FORMAT_VERSION}, the one this code reads; "
                "resume it with the version of the code that wrote it, or start a new run.name"
            )
        return cls(**data)


class Checkpointer:
    """Saves, reports and restores one worker's part of a run's checkpoints."""

    def __init__(self, engine: Any, rank: int, run_name: str, key: bytes) -> None:
        self.engine = engine
        self.rank = rank
        self.run_name = run_name
        self.key = key

    def write(
        self, root: Path, state: TrainState, export: Callable[[Path], None] | None = None
    ) -> None:
        """This rank's part of the checkpoint of ``state.step`` in the local folder ``root``,
        signed. ``export(folder)`` (rank 0, export checkpoints) writes the consolidated model."""
        self.engine.save_checkpoint(str(root / ENGINE_DIR), tag=_tag(state.step))
        (root / RNG_DIR).mkdir()
        (root / RNG_DIR / f"rank_{self.rank:05d}.json").write_text(json.dumps(rng_state()))
        if self.rank == 0:
            (root / STATE_FILE).write_text(state.to_json())
            if export is not None:
                export(root / HF_DIR)
        self._signer(checkpoint_name(state.step)).sign(root, f"rank_{self.rank:05d}")

    def save(
        self,
        state: TrainState,
        metrics: dict[str, float],
        export: Callable[[Path], None] | None = None,
        after_report: Callable[[Path], None] | None = None,
    ) -> None:
        """Write this rank's part, report it to Ray Train (a barrier, which uploads and merges the
        parts), then ``after_report(folder)``, once the checkpoint is persisted."""
        with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
            self.write(Path(tmp), state, export)
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=checkpoint_name(state.step),
            )
            if after_report is not None:
                after_report(Path(tmp))

    def restore(self, checkpoint: Any) -> TrainState | None:
        """Verify a Ray Train checkpoint (``ray.train.get_checkpoint()``), then load it into the
        engine and this process's RNGs."""
        if checkpoint is None:
            return None
        name = str(checkpoint.path).rstrip("/").rsplit("/", 1)[-1]
        where = str(checkpoint.path)
        # Loaded from a private copy made while verifying: a shared folder changed after the
        # check cannot slip a file in.
        with checkpoint.as_directory() as folder, tempfile.TemporaryDirectory() as private:
            signer = self._signer(name)
            root = signer.verified_copy(Path(folder), Path(private) / name, where)
            state = TrainState.from_json((root / STATE_FILE).read_text())
            path, _ = self.engine.load_checkpoint(str(root / ENGINE_DIR), tag=_tag(state.step))
            if path is None:
                raise CheckpointError(f"{where}: no engine state {_tag(state.step)}")
            rng = root / RNG_DIR / f"rank_{self.rank:05d}.json"
            if rng.exists():
                set_rng_state(json.loads(rng.read_text()))
            else:
                log.warning("no RNG state for rank %d in the checkpoint: a fresh seed", self.rank)
        log.info("restored step %d from %s", state.step, name)
        return state

    def _signer(self, name: str) -> FolderSigner:
        return FolderSigner(self.key, f"{self.run_name}/{name}")


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def _tag(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from, as JSON values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": _b64(torch.get_rng_state()),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.numpy().tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
