"""The generic run-config loader: YAML into dataclass trees, overrides, errors, dump and hash."""

from __future__ import annotations

import argparse
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from perceiver_core.config import PerceiverConfig
from perceiver_core.masking import MaskingConfig
from pipelines.config import (
    ConfigError,
    add_config_arguments,
    apply_overrides,
    config_from_args,
    config_hash,
    from_dict,
    load_config,
    to_dict,
    to_yaml,
)


class Precision(enum.Enum):
    BF16 = "bf16"
    FP32 = "fp32"


@dataclass
class Optimizer:
    name: Literal["lamb", "adamw"] = "lamb"
    lr: float = 1.25e-3
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclass
class Source:
    name: str
    weight: float = 1.0


@dataclass
class Train:
    steps: int = 100
    optimizer: Optimizer = field(default_factory=Optimizer)
    precision: Precision = Precision.BF16
    peak_flops: float | None = None
    compile: bool = False
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class Run:
    name: str = "run"
    train: Train = field(default_factory=Train)
    sources: list[Source] = field(default_factory=lambda: [Source("c4", 0.7), Source("wiki", 0.3)])
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    model: PerceiverConfig | None = None
    output: Path = Path("out")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_without_a_file() -> None:
    assert load_config(Run) == Run()


def test_yaml_fills_nested_sections_and_keeps_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
name: tiny
train:
  steps: 5e5            # YAML reads this as a string; an int field still means a number
  optimizer: {lr: 1e-3}
  precision: fp32
sources:
  - {name: c4}
masking: {mask_prob: 0.2}
model: {d_model: 64, id2label: {0: neg, 1: pos}}
""",
    )
    cfg = load_config(Run, path)
    assert cfg.name == "tiny"
    assert cfg.train.steps == 500_000
    assert cfg.train.optimizer == Optimizer(lr=1e-3)
    assert cfg.train.precision is Precision.FP32
    assert cfg.sources == [Source("c4", 1.0)]
    assert cfg.masking == MaskingConfig(mask_prob=0.2)  # a frozen dataclass from another package
    assert cfg.model is not None and cfg.model.d_model == 64
    assert cfg.model.id2label == {0: "neg", 1: "pos"}


def test_overrides_coerce_from_field_types() -> None:
    cfg = load_config(
        Run,
        None,
        [
            "train.steps=20",
            "train.optimizer.name=adamw",
            "train.optimizer.betas=[0.8, 0.95]",
            "train.peak_flops=1.5e12",
            "train.compile=yes",
            "train.tags.owner=me",
            "name=007",  # a string field keeps the text: not the int 7
            "sources.1.weight=0.5",
            "model.d_model=64",  # an unset optional section starts from its defaults
            "output=/tmp/x=y",  # only the first '=' separates key and value
        ],
    )
    assert cfg.train.steps == 20
    assert cfg.train.optimizer.name == "adamw"
    assert cfg.train.optimizer.betas == (0.8, 0.95)
    assert cfg.train.peak_flops == 1.5e12
    assert cfg.train.compile is True
    assert cfg.train.tags == {"owner": "me"}
    assert cfg.name == "007"
    assert cfg.sources[1] == Source("wiki", 0.5)
    assert cfg.model == PerceiverConfig(d_model=64)
    assert cfg.output == Path("/tmp/x=y")
    assert load_config(Run, None, ["train.peak_flops=null"]).train.peak_flops is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "train.optimizer.lrr=1",
            "train.optimizer.lrr: unknown key; expected one of ['betas', 'lr', 'name']",
        ),
        ("trian.steps=1", "trian: unknown key; expected one of"),
        ("train.steps=ten", "train.steps: expected an integer, got str 'ten'"),
        ("train.steps=1.5", "train.steps: expected an integer, got float 1.5"),
        ("train.compile=maybe", "train.compile: expected a boolean"),
        ("train.optimizer.name=sgd", "train.optimizer.name: expected one of ['lamb', 'adamw']"),
        ("train.optimizer.lr=-1", "train.optimizer: lr must be positive"),
        ("train.optimizer.betas=[0.9]", "train.optimizer.betas: expected a list of 2 items"),
        ("train.precision=fp8", "train.precision: expected one of ['bf16', 'fp32']"),
        ("masking.mask_prob=2", "masking: mask_prob must be in (0, 1]"),
        ("sources.5.weight=1", "sources.5: expected an index into a list of 2 items"),
        ("train.steps.x=1", "train.steps: has type int, which has no key 'x'"),
        ("name", "expected KEY=VALUE"),
    ],
)
def test_bad_overrides_name_the_key_and_what_was_expected(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(Run, None, [override])
    assert message in str(info.value)


def test_bad_yaml_values_name_the_key(tmp_path: Path) -> None:
    cases = {
        "train: {optimizer: {lrr: 1}}": "train.optimizer.lrr: unknown key",
        "train: 3": "train: expected a Train mapping, got int 3",
        "name: 1.10": "name: expected a string, got float 1.1",
        "sources: [{weight: 1}]": "sources.0.name: required key missing",
        "sources: {name: c4}": "sources: expected a list",
        "train: {tags: [a]}": "train.tags: expected a mapping",
        "model: {d_model: -1}": "model: PerceiverConfig.d_model must be a positive int",
        "name: [unclosed": "not valid YAML",
    }
    for text, message in cases.items():
        with pytest.raises(ConfigError) as info:
            load_config(Run, write(tmp_path, text))
        assert message in str(info.value), (text, str(info.value))


def test_dump_round_trips_and_hash_is_stable(tmp_path: Path) -> None:
    cfg = load_config(Run, None, ["train.steps=7", "model.d_model=64", "train.tags.b=2"])
    again = load_config(Run, write(tmp_path, to_yaml(cfg)))
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    assert len(config_hash(cfg)) == 16
    # Same values written differently (key order, YAML spelling) give the same hash.
    a = load_config(Run, write(tmp_path, "train: {steps: 1000, compile: true}\nname: x"))
    b = load_config(Run, write(tmp_path, "name: x\ntrain: {compile: 'yes', steps: 1e3}"))
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(apply_overrides(a, ["train.steps=1001"]))
    # Excluded keys do not count.
    renamed = apply_overrides(a, ["name=other"])
    assert config_hash(renamed) != config_hash(a)
    assert config_hash(renamed, exclude=["name"]) == config_hash(a, exclude=["name"])


def test_to_dict_gives_plain_data() -> None:
    data = to_dict(Run())
    assert data["train"]["precision"] == "bf16"
    assert data["train"]["optimizer"]["betas"] == [0.9, 0.999]
    assert data["output"] == "out"
    assert from_dict(Run, data) == Run()


def test_argparse_helpers(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    path = write(tmp_path, "train: {steps: 3}")
    args = parser.parse_args(["--config", str(path), "--set", "name=a", "--set", "train.steps=4"])
    cfg = config_from_args(Run, args)
    assert (cfg.name, cfg.train.steps) == ("a", 4)
