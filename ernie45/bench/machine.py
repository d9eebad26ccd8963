"""What machine a benchmark ran on: the CPU's model name, its vector ISA and the core count (results name it)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

_ISA_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile")


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """{"model_name", "isa_flags" (the vector extensions above that the CPU has), "cpus", "machine"}."""
    model, flags = None, set()
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model is None:
                model = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    model = model or platform.processor() or platform.machine()
    return {"model_name": model, "isa_flags": [f for f in _ISA_FLAGS if f in flags], "cpus": os.cpu_count(),
            "machine": platform.machine()}


def cpu_description() -> str:
    """One line: model name, the widest ISA (AVX-512 / AVX2 / baseline), CPU count."""
    info = cpu_info()
    isa = "AVX-512" if "avx512f" in info["isa_flags"] else "AVX2" if "avx2" in info["isa_flags"] else "baseline"
    return f"{info['model_name']}, {isa}, {info['cpus']} CPUs"
