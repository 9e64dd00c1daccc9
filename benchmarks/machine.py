"""What a benchmark's figures were measured on, for its JSON: the CPU model, whether it has AMX
(Intel's matrix units, about 3x faster bf16 matmuls), the cores, the threads torch uses, the GPU if
any and the library versions, so that figures from different machines are never compared by
mistake. Every script in `benchmarks/` puts it under "machine"; it needs only torch."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def describe() -> dict[str, object]:
    import torch

    cpu, flags = platform.processor() or platform.machine(), set()
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    versions = {}
    for package in ("torch", "transformers", "numpy", "pyarrow", "ray", "deepspeed"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": cpu,
        "amx": "amx_tile" in flags,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": {"python": platform.python_version(), **versions},
    }
