"""The per-worker function of a classify stage: train a sequence classifier, evaluate it on the
task's metric, keep the best weights, stop early.

Every worker reads the whole training and evaluation split (``pipelines.train.finetune_data``),
builds the classifier from the stage's starting weights, wraps it in a DeepSpeed or DDP engine and
restores the last checkpoint if Ray Train hands one over. Evaluations happen at fixed steps (epoch
ends, or every ``eval_every_steps``), on every rank together; each is followed by a checkpoint.
When an evaluation improves on the best score so far, the weights are exported to the stage's
``best/`` folder first, so the checkpoint that records the new best score never exists without
those weights.

Layout of a checkpoint: ``finetune_state.json`` (rank 0), ``rng/rank_XXXXX.pt`` and
``engine/<tag>/...`` (every rank). Layout of ``<run_dir>/best/``: ``step_XXXXXXXX/`` (an HF
directory plus ``metrics.json``) and ``BEST.json`` naming the current one, written last.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perceiver_core.config import PerceiverConfig
from perceiver_core.model import PerceiverForSequenceClassification
from pipelines.tracking.config import TrackingConfig
from pipelines.tracking.sink import MetricsSink, MlflowSink, build_sink
from pipelines.train.checkpoint import load_worker_state, save_worker_state
from pipelines.train.engine import (
    create_engine,
    deepspeed_config,
    full_fp32_state_dict,
    resolve_precision,
)
from pipelines.train.finetune_config import FinetuneTrainSection, StageConfig
from pipelines.train.finetune_data import (
    epoch_order,
    eval_batches,
    rank_slice,
    read_rows,
    steps_per_epoch,
)
from pipelines.train.metrics import duration
from pipelines.train.task_metrics import primary_metric, task_metrics

log = logging.getLogger(__name__)
progress = logging.getLogger("pipelines.train.progress")

STATE_FILE = "finetune_state.json"
BEST_DIR = "best"
BEST_POINTER = "BEST.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ClassifyJob:
    """What the driver resolved for one classify stage (or sweep trial)."""

    stage: StageConfig
    train: FinetuneTrainSection
    tracking: TrackingConfig
    task: str
    seed: int
    model_config: PerceiverConfig  # the classifier's: num_labels, id2label, problem_type set
    init_dir: str  # starting weights (HF directory) as the driver sees them
    init_source: str  # the same, as a source a worker can resolve if it cannot see init_dir
    run_id: str
    tracking_uri: str
    run_dir: str


@dataclass
class FinetuneState:
    step: int = 0  # optimizer steps done in this stage
    evals: int = 0
    best_score: float | None = None
    best_step: int = 0
    best_metrics: dict[str, float] = field(default_factory=dict)
    bad_evals: int = 0  # evaluations since the last improvement
    stopped_early: bool = False

    def to_json(self) -> str:
        return json.dumps({"format_version": FORMAT_VERSION, **asdict(self)}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> FinetuneState:
        data = json.loads(text)
        if data.pop("format_version", None) != FORMAT_VERSION:
            raise ValueError(f"fine-tuning checkpoint format is not {FORMAT_VERSION}")
        return cls(**data)


def classify_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: ``TorchTrainer(classify_loop_per_worker, {"job": ClassifyJob})``."""
    import ray.train

    from pipelines.train.loop import _log_to_console

    _log_to_console()
    context = ray.train.get_context()
    ClassifyWorker(config["job"], context.get_world_rank(), context.get_world_size()).run()


class ClassifyWorker:
    def __init__(self, job: ClassifyJob, rank: int, world_size: int) -> None:
        import ray.train

        self.job, self.stage = job, job.stage
        self.rank, self.world_size = rank, world_size
        started = time.perf_counter()
        self.train_rows = read_rows(ray.train.get_dataset_shard("train"))
        self.eval_rows = read_rows(ray.train.get_dataset_shard("eval"))
        self.per_epoch = steps_per_epoch(len(self.train_rows), self.stage.batch_size)
        if self.per_epoch == 0 or len(self.eval_rows) == 0:
            raise ValueError(
                f"stage {self.stage.name}: {len(self.train_rows)} training rows make no batch of "
                f"{self.stage.batch_size}, or the evaluation split is empty "
                f"({len(self.eval_rows)} rows)"
            )
        self.total = self.per_epoch * self.stage.epochs
        self.metric = primary_metric(job.task, job.model_config.num_labels)
        self.engine = self._build_engine()
        self.state = self._restore(ray.train.get_checkpoint())
        self.sink: MetricsSink = build_sink(rank, self._make_sink)
        log.info(
            "rank %d: %d training / %d evaluation rows in %.1f s; %d steps per epoch; step %d",
            rank,
            len(self.train_rows),
            len(self.eval_rows),
            time.perf_counter() - started,
            self.per_epoch,
            self.state.step,
        )

    # -- set-up ----------------------------------------------------------------------------------

    def _build_engine(self) -> Any:
        from deepspeed.accelerator import get_accelerator

        job, t = self.job, self.job.train
        torch.manual_seed(job.seed)  # the same fresh head on every rank
        model = PerceiverForSequenceClassification(job.model_config)
        _load_init(model, job)
        if self.stage.freeze_encoder:
            model.encoder.requires_grad_(False)
        torch.manual_seed(job.seed + 1 + self.rank)  # dropout differs per rank
        precision = resolve_precision(t.precision, get_accelerator().is_bf16_supported())
        if t.strategy == "ddp":
            from pipelines.train.ddp import DdpEngine

            if t.use_gpu:
                model = model.to(get_accelerator().current_device_name())
            return DdpEngine(
                model,
                self.stage.optimizer,
                self.total,
                precision=precision,
                grad_clip=t.grad_clip,
                rank=self.rank,
            )
        ds_config = deepspeed_config(
            micro_batch_size=self.stage.batch_size // self.world_size,
            grad_accum_steps=1,
            world_size=self.world_size,
            zero_stage=t.zero_stage,
            precision=precision,
            grad_clip=t.grad_clip,
            on_gpu=t.use_gpu,
        )
        return create_engine(model, ds_config, self.stage.optimizer, self.total)

    def _restore(self, checkpoint: Any) -> FinetuneState:
        if checkpoint is None:
            return FinetuneState()
        with checkpoint.as_directory() as folder:
            root = Path(folder)
            state = FinetuneState.from_json((root / STATE_FILE).read_text())
            load_worker_state(self.engine, root, "engine", state.step, self.rank)
        log.info("restored stage %s at step %d", self.stage.name, state.step)
        return state

    def _make_sink(self) -> MetricsSink:
        return MlflowSink.from_config(self.job.run_id, self.job.tracking_uri, self.job.tracking)

    # -- the loop --------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._train()
        finally:
            self.sink.close()

    def _train(self) -> None:
        state, stage = self.state, self.stage
        losses: list[torch.Tensor] = []
        started, examples = time.perf_counter(), 0
        order_epoch, order = -1, np.zeros(0, dtype=np.int64)
        while state.step < self.total and not state.stopped_early:
            epoch, in_epoch = divmod(state.step, self.per_epoch)
            if epoch != order_epoch:
                order_epoch, order = epoch, epoch_order(len(self.train_rows), self.job.seed, epoch)
            rows = rank_slice(order, in_epoch, stage.batch_size, self.rank, self.world_size)
            out = self.engine(**self.train_rows.batch(rows, self.engine.device))
            self.engine.backward(out.loss)
            self.engine.step()
            losses.append(out.loss.detach().float())
            examples += stage.batch_size
            state.step += 1
            if state.step % self.job.train.log_every == 0 or state.step == self.total:
                elapsed = time.perf_counter() - started
                self._log_train(losses, examples / max(elapsed, 1e-9))
                losses, started, examples = [], time.perf_counter(), 0
            if self._is_eval_step():
                self._evaluate_and_checkpoint()

    def _is_eval_step(self) -> bool:
        step, every = self.state.step, self.stage.eval_every_steps
        return step % self.per_epoch == 0 or step == self.total or bool(every and step % every == 0)

    def _log_train(self, losses: list[torch.Tensor], examples_per_s: float) -> None:
        loss = torch.stack(losses).mean()
        if self.world_size > 1:
            torch.distributed.all_reduce(loss)
            loss /= self.world_size
        metrics = {
            "train/loss": float(loss),
            "train/lr": float(self.engine.get_lr()[0]),
            "perf/examples_per_s": examples_per_s,
        }
        self.sink.log(self.state.step, metrics)
        if self.rank == 0:
            epoch = self.state.step / self.per_epoch
            # ETA at the latest rate, evaluations and checkpoints included in it.
            left = (
                (self.total - self.state.step) * self.stage.batch_size / max(examples_per_s, 1e-9)
            )
            progress.info(
                "%s | step %d/%d (epoch %.2f/%d) | loss %.4f | lr %.2e | %.1f examples/s | ETA %s",
                self.stage.name,
                self.state.step,
                self.total,
                epoch,
                self.stage.epochs,
                metrics["train/loss"],
                metrics["train/lr"],
                examples_per_s,
                duration(left),
            )

    # -- evaluation, best weights, checkpoints ---------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The task's metrics over the whole evaluation split (the same values on every rank)."""
        rows = self.eval_rows
        indices, logits = [], []
        self.engine.eval()
        try:
            for batch in eval_batches(
                len(rows), self.job.train.eval_batch_size, self.rank, self.world_size
            ):
                # Every rank runs the same number of forward passes (a collective under ZeRO-3);
                # a rank out of rows runs one on row 0 and drops it.
                take = batch if len(batch) else np.zeros(1, dtype=np.int64)
                inputs = rows.batch(take, self.engine.device)
                inputs.pop("labels")
                out = self.engine(**inputs)
                if len(batch):
                    indices.append(batch)
                    logits.append(out.logits.float().cpu().numpy())
        finally:
            self.engine.train()
        local = (
            np.concatenate(indices) if indices else np.zeros(0, np.int64),
            np.concatenate(logits) if logits else np.zeros((0, self.job.model_config.num_labels)),
        )
        parts = [local]
        if self.world_size > 1:
            parts = [None] * self.world_size  # type: ignore[list-item]
            torch.distributed.all_gather_object(parts, local)
        order = np.concatenate([p[0] for p in parts])
        all_logits = np.concatenate([p[1] for p in parts])[np.argsort(order)]
        metrics = task_metrics(
            self.job.task, self.job.model_config.num_labels, all_logits, rows.labels
        )
        metrics["loss"] = _eval_loss(all_logits, rows.labels)
        return metrics

    def _evaluate_and_checkpoint(self) -> None:
        state, metric = self.state, self.metric
        metrics = self.evaluate()
        score = metrics[metric.name]
        state.evals += 1
        improved = state.best_score is None or (
            score > state.best_score if metric.higher_is_better else score < state.best_score
        )
        if improved:
            state.best_score, state.best_step, state.best_metrics = score, state.step, metrics
            state.bad_evals = 0
            self._export_best(metrics)
        else:
            state.bad_evals += 1
            if self.stage.patience and state.bad_evals >= self.stage.patience:
                state.stopped_early = True
        logged = {f"eval/{k}": v for k, v in metrics.items()}
        logged[f"best/{metric.name}"] = float(state.best_score)
        self.sink.log(state.step, logged)
        if self.rank == 0:
            progress.info(
                "%s | step %d eval %s %.4f (best %.4f at step %d)%s",
                self.stage.name,
                state.step,
                metric.name,
                score,
                state.best_score,
                state.best_step,
                " | stopping early" if state.stopped_early else "",
            )
        self._checkpoint({**logged, "step": float(state.step)})

    def _export_best(self, metrics: dict[str, float]) -> None:
        """Write the current weights to ``best/step_N`` and point ``BEST.json`` at them."""
        weights = full_fp32_state_dict(self.engine, self.rank)  # a collective
        if self.rank != 0:
            return
        from perceiver_core.hf import save_pretrained

        model = PerceiverForSequenceClassification(self.job.model_config)
        model.load_state_dict(weights)
        name = f"step_{self.state.step:08d}"
        with tempfile.TemporaryDirectory(prefix="best-") as tmp:
            folder = save_pretrained(model, Path(tmp) / name)
            (folder / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
            upload(folder, f"{self.job.run_dir}/{BEST_DIR}/{name}")
        write_text(
            f"{self.job.run_dir}/{BEST_DIR}/{BEST_POINTER}",
            json.dumps({"folder": name, "step": self.state.step, "metrics": metrics}),
        )

    def _checkpoint(self, metrics: dict[str, float]) -> None:
        import ray.train

        if not self.sink.flush(self.job.tracking.checkpoint_flush_s):
            log.warning("metrics up to step %d not yet stored in MLflow", self.state.step)
        with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
            root = Path(tmp)
            save_worker_state(self.engine, root, "engine", self.state.step, self.rank)
            if self.rank == 0:
                (root / STATE_FILE).write_text(self.state.to_json())
            ray.train.report(
                metrics if self.rank == 0 else {},
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"checkpoint_{self.state.step:08d}",
            )


def _load_init(model: PerceiverForSequenceClassification, job: ClassifyJob) -> None:
    """The starting weights: the encoder always; the head too when the source is a classifier
    with the same labels (a later stage of the recipe), else it stays freshly initialised."""
    from perceiver_core.hf import load_into, load_state_dict

    folder = Path(job.init_dir)
    if not (folder / "config.json").is_file():  # not visible here: fetch it on this node
        from pipelines.tracking.models import resolve_model

        folder = resolve_model(job.init_source, tracking_uri=job.tracking_uri).hf_dir
    weights = load_state_dict(folder)
    config = json.loads((folder / "config.json").read_text())
    same_head = (
        "PerceiverForSequenceClassification" in config.get("architectures", [])
        and len(config.get("id2label", {})) == job.model_config.num_labels
    )
    if not same_head:
        weights = {k: v for k, v in weights.items() if "decoder" not in k and "cls_head" not in k}
    load_into(model, weights, strict=same_head)


def _eval_loss(logits: np.ndarray, labels: np.ndarray) -> float:
    if logits.shape[-1] == 1:
        return float(np.mean((logits.reshape(-1) - labels.astype(np.float64)) ** 2))
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels.astype(np.int64)].mean())


# -- storage helpers (a local folder or s3:// through pyarrow's filesystems) -------------------


def upload(local: Path, dest: str) -> None:
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(dest if "://" in dest else str(Path(dest).resolve()))
    fs.create_dir(path, recursive=True)
    pyarrow.fs.copy_files(str(local), path, pyarrow.fs.LocalFileSystem(), fs)


def write_text(dest: str, text: str) -> None:
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(dest if "://" in dest else str(Path(dest).resolve()))
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(f"{path}.tmp") as f:
        f.write(text.encode())
    fs.move(f"{path}.tmp", path)


def read_text(src: str) -> str | None:
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(src if "://" in src else str(Path(src).resolve()))
    if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def best_weights(run_dir: str, dest: Path) -> tuple[Path, dict[str, Any]]:
    """Copy the stage's best weights to the local ``dest``; returns (HF folder, BEST.json)."""
    import pyarrow.fs

    pointer = read_text(f"{run_dir}/{BEST_DIR}/{BEST_POINTER}")
    if pointer is None:
        raise FileNotFoundError(f"{run_dir}/{BEST_DIR}: the stage recorded no best weights")
    best = json.loads(pointer)
    src = f"{run_dir}/{BEST_DIR}/{best['folder']}"
    if "://" not in src:
        return Path(src).resolve(), best
    fs, path = pyarrow.fs.FileSystem.from_uri(src)
    local = dest / best["folder"]
    pyarrow.fs.copy_files(path, str(local), fs, pyarrow.fs.LocalFileSystem())
    return local, best
