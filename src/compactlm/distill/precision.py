"""What the training forwards compute in: the `autocast` key resolved for a device.

bf16 autocast runs the models' matrix products in bfloat16 (weights, optimizer state and the chunked loss's
softmax stay float32). It pays where the hardware multiplies bf16 natively: CUDA, and x86 CPUs with AVX512-BF16
or AMX (1.3-1.6x a KD step on 2 EPYC cores, `benchmarks/bench_cpu_bf16.py`). Elsewhere torch converts, and
a CPU without them runs bf16 products 12x slower than float32: `auto` leaves those CPUs in float32.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

AUTOCAST = ("auto", "bf16", "off")


@functools.cache
def native_bf16_cpu() -> bool:
    """This CPU multiplies bf16 natively: Linux's flags list avx512_bf16 or amx_bf16 (and oneDNN can use them)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: no way to tell here, so no
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags)) and torch.backends.mkldnn.is_available()


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """bfloat16 when the forwards should autocast to it on `device`, else None (float32 compute).
    auto: on CUDA, and on a CPU with native bf16 (`native_bf16_cpu`); bf16: always; off: never."""
    if setting not in AUTOCAST:
        raise ValueError(f"autocast={setting!r}: expected one of {', '.join(AUTOCAST)}")
    if setting == "off" or device.type not in ("cuda", "cpu"):
        return None
    if setting == "bf16" or device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if native_bf16_cpu() else None


def describe(dtype: torch.dtype | None) -> str:
    """The name a result and the report give the compute: "bf16 autocast" or "float32"."""
    return "bf16 autocast" if dtype is not None else "float32"
