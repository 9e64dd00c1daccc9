"""Checkpoint I/O of pretraining: the one component that writes, reports and reads checkpoints.

Layout of a checkpoint (one folder in Ray Train's storage, merged from every rank's files):

    train_state.json          rank 0: format version, step, data position, run id, config hash
    rng/rank_00000.pt         each rank: torch, numpy and Python RNG states
    deepspeed/step_00000120/  each rank's DeepSpeed files (model, optimizer and schedule state;
    deepspeed/latest          ZeRO shards are per rank)
    hf/                       export checkpoints only: the consolidated fp32 weights in
                              perceiver_core's Hugging Face format (config.json, model.safetensors)

Every rank writes its part into a local temporary folder and calls ``ray.train.report`` with it;
Ray Train uploads and merges the parts (a local path or s3://). On resume every rank loads the
DeepSpeed state into a freshly built engine, then its RNG state (by rank; a rank the checkpoint
lacks keeps its fresh seed). ``train_state.json`` carries ``format_version``; a checkpoint written
by a newer layout is refused rather than misread.

Beside the checkpoints, in the run's storage folder, ``resume_pointer.json`` holds a data position
for the stream factory (see ``pipelines.train.data``).
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipelines.train.data import DataPosition

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
STATE_FILE = "train_state.json"
HF_DIR = "hf"
POINTER_FILE = "resume_pointer.json"


@dataclass(frozen=True)
class TrainState:
    """What besides DeepSpeed's state a resumed run needs."""

    step: int
    position: DataPosition
    run_id: str | None
    config_hash: str
    world_size: int
    zero_stage: int

    def to_json(self) -> str:
        data = {
            "format_version": FORMAT_VERSION,
            "step": self.step,
            "position": self.position.to_dict(),
            "run_id": self.run_id,
            "config_hash": self.config_hash,
            "world_size": self.world_size,
            "zero_stage": self.zero_stage,
        }
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        data = json.loads(text)
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"checkpoint format {version} is not {FORMAT_VERSION}, the one this code reads"
            )
        return cls(
            step=int(data["step"]),
            position=DataPosition.from_dict(data["position"]),
            run_id=data["run_id"],
            config_hash=data["config_hash"],
            world_size=int(data["world_size"]),
            zero_stage=int(data["zero_stage"]),
        )


class ResumePointer:
    """A data position stored in the run's storage folder (local or s3://), read by the stream
    factory before workers start. pyarrow's filesystems give one code path for both."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir.rstrip("/")

    def _fs(self) -> tuple[Any, str]:
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(self.run_dir)
        return fs, f"{path}/{POINTER_FILE}"

    def read(self) -> int:
        import pyarrow.fs

        fs, path = self._fs()
        if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
            return 0
        with fs.open_input_stream(path) as f:
            return int(json.loads(f.read().decode())["watermark"])

    def write(self, watermark: int) -> None:
        fs, path = self._fs()
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        tmp = f"{path}.tmp"
        with fs.open_output_stream(tmp) as f:
            f.write(json.dumps({"watermark": watermark}).encode())
        fs.move(tmp, path)  # atomic on local disks; S3 writes whole objects anyway


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_worker_state(engine: Any, root: Path, subdir: str, step: int, rank: int) -> None:
    """This rank's part of a checkpoint folder: the engine's state (DeepSpeed, or the DDP engine
    of pipelines.train.ddp) under ``root/subdir`` tagged ``step_N``, and its RNG states."""
    engine.save_checkpoint(str(root / subdir), tag=f"step_{step:08d}")
    (root / "rng").mkdir(exist_ok=True)
    torch.save(rng_state(), root / "rng" / f"rank_{rank:05d}.pt")


def load_worker_state(engine: Any, root: Path, subdir: str, step: int, rank: int) -> bool:
    """Load what ``save_worker_state`` wrote into a freshly built engine and this process's RNGs;
    False when the folder has no RNG state for this rank (a checkpoint of fewer workers)."""
    tag = f"step_{step:08d}"
    path, _ = engine.load_checkpoint(str(root / subdir), tag=tag)
    if path is None:
        raise RuntimeError(f"the engine found no checkpoint {tag} in {root / subdir}")
    rng = root / "rng" / f"rank_{rank:05d}.pt"
    if not rng.exists():
        return False
    set_rng_state(torch.load(rng, weights_only=False))
    return True


class Checkpointer:
    """Saves and restores one worker's part of a checkpoint, and keeps the resume pointer."""

    def __init__(self, engine: DeepSpeedEngine, rank: int, pointer: ResumePointer) -> None:
        self.engine = engine
        self.rank = rank
        self.pointer = pointer
        # Watermark of the newest checkpoint known to be committed (restored, or reported before
        # the latest one): what the pointer may safely say.
        self._committed_watermark = 0
        self.last_saved_step: int | None = None

    def restore(self, checkpoint: Any) -> TrainState | None:
        """Load a Ray Train checkpoint (``ray.train.get_checkpoint()``) into the engine and RNGs."""
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            root = Path(folder)
            state = TrainState.from_json((root / STATE_FILE).read_text())
            if not load_worker_state(self.engine, root, "deepspeed", state.step, self.rank):
                log.warning(
                    "no RNG state for rank %d in the checkpoint; keeping a fresh seed", self.rank
                )
        self._committed_watermark = state.position.watermark
        self.last_saved_step = state.step
        log.info("restored step %d (%d crops consumed)", state.step, state.position.consumed)
        return state

    def save(
        self,
        state: TrainState,
        metrics: dict[str, float],
        hf_state: dict[str, torch.Tensor] | None = None,
        model_config: Any = None,
        after_report: Any = None,
    ) -> None:
        """Write this rank's part, report it to Ray Train, then run ``after_report(folder)``
        (rank 0 registers the exported model from ``folder/hf`` there, once it is persisted).

        ``hf_state`` (rank 0, export checkpoints) is written as the ``hf/`` export.
        """
        import ray.train

        from perceiver_core.hf import save_pretrained
        from perceiver_core.model import PerceiverForMaskedLM

        with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
            root = Path(tmp)
            save_worker_state(self.engine, root, "deepspeed", state.step, self.rank)
            if self.rank == 0:
                (root / STATE_FILE).write_text(state.to_json())
                if hf_state is not None:
                    model = PerceiverForMaskedLM(model_config)
                    model.load_state_dict(hf_state)
                    save_pretrained(model, root / HF_DIR)
                # The pointer lags one checkpoint behind: this one is not committed until Ray
                # Train has it, the previous one is.
                self.pointer.write(self._committed_watermark)
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"checkpoint_{state.step:08d}",
            )
            if after_report is not None:
                after_report(root)
        self._committed_watermark = state.position.watermark
        self.last_saved_step = state.step
