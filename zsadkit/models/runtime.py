"""Run-time switches of the towers, in one place: numeric precision and the attention kernel.

None of these changes what a method computes, only how (and, for bf16/fp16, how precisely):

* Precision (`PRECISIONS`): "fp32" (the default, and the reference's), "bf16" or "fp16". The image towers
  (`zsadkit.models.VisualEncoder`) run under `torch.autocast` in the chosen dtype and hand back float32 tensors, so
  everything after the tower (text similarities, softmax, upsampling, smoothing, metrics) stays in float32. Text
  features are always computed in float32 (`frozen_features`): they are encoded once per class and reused.
  On CPU, bf16 autocast is fast where the processor has bf16 instructions (`cpu_has_bf16`); fp16 autocast on CPU
  is allowed but slow.
* Attention kernel (`ATTENTION_KERNELS`): "sdpa" (the default) runs every attention through
  `torch.nn.functional.scaled_dot_product_attention`, which on CPU and GPU never materialises the (N × N) attention
  matrix; "explicit" writes out softmax(q kᵀ / √d) v, for parity checks (`explicit_attention()`); "module" runs
  the plain blocks through their own open_clip forward (`nn.MultiheadAttention`, the references' arithmetic: what
  the `zsadkit.verify` commands compare by default) and the variant attentions through SDPA.

`inference(precision)` is what `zsadkit.engine.predict` and `zsadkit.predict` wrap a detector's calls in:
`torch.inference_mode` plus the precision. `PeakMemory` measures a block's peak memory (CUDA allocator, or the
process's resident set on CPU) for the benchmarks and the comparison's cost columns.

Example:
    >>> with run_settings(precision="bf16"):
    ...     current_precision()
    'bf16'
    >>> current_precision()
    'fp32'
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ATTENTION_KERNELS",
    "PRECISIONS",
    "PeakMemory",
    "attention_kernel",
    "autocast_dtype",
    "check_precision",
    "cpu_has_bf16",
    "current_precision",
    "explicit_attention",
    "frozen_features",
    "inference",
    "peak_memory_mib",
    "reset_peak_memory",
    "run_settings",
    "synchronize",
    "tower_autocast",
]

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
ATTENTION_KERNELS: tuple[str, ...] = ("sdpa", "explicit", "module")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class _Settings:
    precision: str = "fp32"
    attention: str = "sdpa"


_SETTINGS = _Settings()


def check_precision(precision: str) -> str:
    """`precision` if it is one of `PRECISIONS`, else a ValueError naming them."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def current_precision() -> str:
    """The precision the image towers run in now ("fp32" unless inside `run_settings(precision=...)`)."""
    return _SETTINGS.precision


def attention_kernel() -> str:
    """The attention kernel in use now: "sdpa" or "explicit"."""
    return _SETTINGS.attention


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision (None for "fp32")."""
    return _DTYPES[check_precision(precision)]


@contextlib.contextmanager
def run_settings(*, precision: str | None = None, attention: str | None = None) -> Iterator[None]:
    """Set the precision and/or attention kernel for a block; the previous settings come back after it."""
    if precision is not None:
        check_precision(precision)
    if attention is not None and attention not in ATTENTION_KERNELS:
        raise ValueError(f"attention must be one of {ATTENTION_KERNELS}, got {attention!r}")
    saved = _Settings(_SETTINGS.precision, _SETTINGS.attention)
    _SETTINGS.precision = precision or saved.precision
    _SETTINGS.attention = attention or saved.attention
    try:
        yield
    finally:
        _SETTINGS.precision, _SETTINGS.attention = saved.precision, saved.attention


def explicit_attention() -> contextlib.AbstractContextManager[None]:
    """Attention written out as softmax(q kᵀ s) v instead of SDPA (parity checks; slower, more memory)."""
    return run_settings(attention="explicit")


def tower_autocast(device: torch.device | str) -> contextlib.AbstractContextManager[Any]:
    """`torch.autocast` on `device`'s type in the current precision; nothing for "fp32"."""
    dtype = _DTYPES[_SETTINGS.precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


@contextlib.contextmanager
def frozen_features() -> Iterator[None]:
    """For features a method computes once and keeps (text embeddings of a class): no graph, float32 (autocast
    off), and ordinary tensors even inside `torch.inference_mode`, so that training may use them later."""
    with torch.inference_mode(False), torch.no_grad(), run_settings(precision="fp32"):
        devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
        with contextlib.ExitStack() as stack:
            for device in devices:
                stack.enter_context(torch.autocast(device, enabled=False))
            yield


@contextlib.contextmanager
def inference(precision: str = "fp32") -> Iterator[None]:
    """`torch.inference_mode` with the image towers in `precision` (the engine's and `zsadkit.predict`'s scope)."""
    check_precision(precision)
    with torch.inference_mode(), run_settings(precision=precision):
        yield


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((check is not None and check()) or (amx is not None and amx()))



# ----------------------------------------------------------------------------------------------- measurement
def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _status_mib(field: str) -> float | None:
    """A memory line of /proc/self/status (Linux) in MiB, or None elsewhere."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024  # kB
    return None


def reset_peak_memory(device: str | torch.device) -> bool:
    """Start a new peak-memory phase: CUDA's allocator peak, or on Linux the process's resident-set high-water
    mark (writing 5 to /proc/self/clear_refs). False where the CPU mark cannot be reset (it is the process's)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_memory_mib(device: str | torch.device) -> float:
    """Peak since `reset_peak_memory`: CUDA's allocated peak, or the process's resident-set high-water mark
    (VmHWM; `resource.getrusage` where /proc is absent, a lifetime peak)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = _status_mib("VmHWM")
    if peak is not None:
        return peak
    import resource
    import sys

    maximum = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maximum / 2**20 if sys.platform == "darwin" else maximum / 1024  # macOS: bytes; Linux: kB


class PeakMemory:
    """Peak memory of a `with` block: `mib` (the peak) and `above_start` (the peak minus what was in use when the
    block began). CUDA: the allocator's; CPU: the process's resident set (`kind` says which, and whether the CPU
    mark could be reset: if not, the peak is the process's lifetime peak)."""

    def __init__(self, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.mib = self.above_start = float("nan")
        self.kind = ""

    def __enter__(self) -> PeakMemory:
        cuda = self.device.type == "cuda"
        reset = reset_peak_memory(self.device)
        self._start = (torch.cuda.memory_allocated(self.device) / 2**20 if cuda
                       else (_status_mib("VmRSS") or peak_memory_mib(self.device)))
        self.kind = ("cuda peak allocated" if cuda else
                     "process RSS peak" if reset else "process RSS peak (lifetime: the mark could not be reset)")
        return self

    def __exit__(self, *exc_info: object) -> None:
        synchronize(self.device)
        self.mib = peak_memory_mib(self.device)
        self.above_start = self.mib - self._start
