"""The settings that decide the pretraining crops, in a module of their own: the index, the
mixture and the stream all read them, and none of those needs another to know its settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from perceiver_core.masking import MaskingConfig
from perceiver_core.packing import PackingConfig
from pipelines.data.readers import ReadConfig
from pipelines.data.sources import SourceConfig, default_sources
from pipelines.data.units import SplitConfig

MAX_POSITION = 1 << 44  # stream positions; keeps 2 * position * quantum inside int64


@dataclass
class MixtureConfig:
    """How sources are interleaved (weights are on the sources).

    stopping_strategy: what happens when a source runs out (see the module docstring).
    balance: ``bytes`` makes the weights shares of real bytes, ``crops`` shares of crops.
    max_crops: cap on the stream length in crops (required for ``cycle``).
    shuffle_units: visit each source's units (row groups, JSON files) in a seeded order, new for
        every pass; documents inside a unit keep their file order (groups are consecutive rows).
    seed: seed of that order.
    """

    stopping_strategy: Literal["all_exhausted", "first_exhausted", "cycle"] = "all_exhausted"
    balance: Literal["bytes", "crops"] = "bytes"
    max_crops: int | None = None
    shuffle_units: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        strategies = ("all_exhausted", "first_exhausted", "cycle")
        if self.stopping_strategy not in strategies:
            raise ValueError(
                f"stopping_strategy must be one of {strategies}, got {self.stopping_strategy!r}"
            )
        if self.balance not in ("bytes", "crops"):
            raise ValueError(f"balance must be 'bytes' or 'crops', got {self.balance!r}")
        if self.max_crops is not None and not 0 < self.max_crops < MAX_POSITION:
            raise ValueError(
                f"max_crops must be a positive integer or null, got {self.max_crops!r}"
            )
        if self.stopping_strategy == "cycle" and self.max_crops is None:
            raise ValueError("max_crops must be set when stopping_strategy is 'cycle'")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")


@dataclass
class PretrainDataConfig:
    """Everything that decides the pretraining crops.

    sources: corpora and their weights (default: C4 ``en`` 0.7, Wikipedia ``20231101.en`` 0.3).
    data_dir: local mirror of the Hub: ``hf://datasets/ORG/NAME`` reads ``DATA_DIR/NAME``.
    packing / masking: perceiver_core's settings (groups of 10, 2048-byte crops, 15% of words).
    split: the held-out validation split by document hash.
    mixture: interleaving, stopping strategy, unit order.
    read: bad-file policy and read chunk size.
    task_crops: positions per Ray task, at least (bigger: fewer, longer tasks).
    block_crops: crops per output block and per masking call.
    """

    sources: list[SourceConfig] = field(default_factory=default_sources)
    data_dir: str | None = None
    packing: PackingConfig = field(default_factory=PackingConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    read: ReadConfig = field(default_factory=ReadConfig)
    task_crops: int = 16384
    block_crops: int = 256

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("sources must list at least one source")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"sources must have distinct names, got {names}")
        if len(self.sources) > 255:
            raise ValueError("at most 255 sources (the source column is uint8)")
        if self.packing.crop_len > 65535:
            raise ValueError("packing.crop_len must fit uint16 (<= 65535)")
        for name in ("task_crops", "block_crops"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
