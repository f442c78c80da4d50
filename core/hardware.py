"""What the local hardware computes fast; asked where the work runs (a Ray worker's node)."""

from functools import cache
from pathlib import Path


@cache
def native_bf16() -> bool:
    """True on GPUs and on CPUs with bf16 instructions (AVX512_BF16 or AMX).

    Elsewhere (AVX2-only CPUs) torch emulates bf16 matmuls, far slower than
    fp32 (docs/benchmarks.md, "vLLM on this CPU").
    """
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags

