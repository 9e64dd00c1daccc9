"""Print a few decoded crops of a data config, masked words marked ⟦like this⟧, and the counters.

    python -m jobs.inspect_data --config pipelines/data/configs/shared_data.yaml
    python -m jobs.inspect_data --config jobs/configs/pretrain_tiny.yaml --crops 5
    python -m jobs.inspect_data --set data_dir=../shared/data --set sources.1.config=20150501.en

``--config`` takes a data config (``PretrainDataConfig``) or a whole run config, whose ``data``
section is used; ``--set`` keys are relative to the data config. Without ``--config`` the defaults
read the Hub (C4 ``en`` and Wikipedia ``20231101.en``). Only the first ``--max-files`` files of each
source are indexed (default 1; 0 = all), so the command stays quick on full corpora. Connects to
``RAY_ADDRESS`` if set, else starts Ray in-process.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from jobs import report_user_error, start_ray
from pipelines.config import (
    ConfigError,
    add_config_arguments,
    apply_overrides,
    from_dict,
    read_yaml,
)
from pipelines.data.config import PretrainDataConfig
from pipelines.data.index import list_source_files
from pipelines.data.inspect import inspect_report


def load_data_config(path: Path | None, overrides: list[str]) -> PretrainDataConfig:
    data = read_yaml(path) if path else {}
    if isinstance(data, dict) and "data" in data and "sources" not in data:
        data = data["data"] or {}  # a run config: its data section
    return apply_overrides(from_dict(PretrainDataConfig, data), overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.inspect_data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser)
    parser.add_argument("--split", default="train", choices=["train", "validation"])
    parser.add_argument("--start", type=int, default=0, help="stream position of the first crop")
    parser.add_argument("--crops", type=int, default=3, help="crops to print")
    parser.add_argument("--sample", type=int, default=512, help="crops counted for the counters")
    parser.add_argument("--max-files", type=int, default=1, help="files per source (0 = all)")
    args = parser.parse_args(argv)
    try:
        cfg = load_data_config(args.config, args.overrides)
    except (ConfigError, OSError) as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    if args.max_files:
        cfg.sources = [dataclasses.replace(s, max_files=args.max_files) for s in cfg.sources]

    try:
        list_source_files(cfg)  # a missing or empty source fails here, before Ray starts
        start_ray(logging_level=logging.WARNING)
        report = inspect_report(
            cfg, split=args.split, start=args.start, show=args.crops, sample=args.sample
        )
    except Exception as error:
        return report_user_error(error)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
