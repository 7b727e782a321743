"""Where a model runs and in which precision it computes.

GPUs and CPUs with bf16 matrix units (Intel AMX, ``avx512_bf16``) multiply bf16 several times
faster than fp32. On this project's CPU (a Xeon with AMX, torch 2.13, oneDNN 3.12) bf16
autocast ran a MiniLM forward ~3x and a SmolLM2-135M forward + backward ~2.5x faster than fp32
(issue 16). So ``auto`` computes in bf16 wherever such units exist: on CUDA with bf16 weights
(as before), on such a CPU with fp32 weights under ``torch.autocast`` (the matmuls run in bf16,
softmax, norms and the head's output stay fp32). ``float32`` turns it off.

A score in bf16 depends on more than its item unless the shapes it is computed in are fixed:
see :func:`canonical_rows_and_length`.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

# bf16 kernels on CPU (oneDNN) pick their code path by the problem's shape: in measurements on
# MiniLM (issue 16) a row's bf16 result did not depend on the other rows of its batch once
# (1) the sequence length was a multiple of 32 with at least one padded position (an unpadded
# batch takes attention's unmasked path), and (2) the batch held at least 512 tokens (below
# that, the small-matrix path accumulates in another order). fp32 needs neither (≤ 1e-6).
SEQUENCE_QUANTUM = 32
MIN_BATCH_TOKENS = 512


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@functools.cache
def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX or AVX512-BF16; Linux flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def has_bf16_units(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16_units()


@dataclass(frozen=True)
class Precision:
    """The dtype of the weights and, when mixed precision is on, of the autocast region."""

    weights: torch.dtype
    autocast: torch.dtype | None = None

    @property
    def name(self) -> str:
        """What a response, ``/ready`` or a results file reports."""
        if self.autocast is not None:
            return f"{str(self.autocast).removeprefix('torch.')} autocast"
        return str(self.weights).removeprefix("torch.")


def resolve_precision(setting: str, device: torch.device) -> Precision:
    """``auto``: bf16 where the hardware has bf16 units (CUDA: bf16 weights, or fp16 without
    bf16; CPU: fp32 weights + bf16 autocast), fp32 elsewhere. ``bfloat16`` on a CPU means
    fp32 weights + bf16 autocast too; ``float32``/``float64``/``float16`` are the weights'
    dtype with no autocast."""
    if setting == "auto":
        if device.type == "cuda":
            return Precision(torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        if has_bf16_units(device):
            return Precision(torch.float32, torch.bfloat16)
        return Precision(torch.float32)
    if setting == "bfloat16" and device.type == "cpu":
        return Precision(torch.float32, torch.bfloat16)
    return Precision(getattr(torch, setting))


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The weights' dtype of a precision setting (see :func:`resolve_precision`)."""
    return resolve_precision(dtype, device).weights


def mixed_precision(device: torch.device, enabled: bool,
                    weights: torch.dtype = torch.float32) -> torch.dtype | None:
    """The autocast dtype a trainer uses with its ``bf16`` switch: bf16 for fp32 weights where
    the hardware has bf16 units, else None (fp32, and float64 gradient checks, stay exact)."""
    if not enabled or weights != torch.float32 or not has_bf16_units(device):
        return None
    return torch.bfloat16


def training_precision_name(device: torch.device, bf16: bool = True) -> str:
    """What a trainer with this ``bf16`` switch computes in on ``device``, as results files
    record it (issue 16: benchmarks say which precision their numbers came from)."""
    dtype = mixed_precision(device, bf16)
    return "bfloat16 autocast" if dtype is not None else "float32"


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.autocast`` to ``dtype`` on ``device``, or nothing when ``dtype`` is None."""
    if dtype is None:
        yield
        return
    with torch.autocast(device.type, dtype=dtype):
        yield


def canonical_rows_and_length(rows: int, longest: int) -> tuple[int, int]:
    """The shape a bf16 CPU batch is scored in so that each row's result is the row's alone:
    the length rounded up to a multiple of SEQUENCE_QUANTUM with at least one padded position,
    and at least MIN_BATCH_TOKENS tokens (extra rows are fillers, discarded)."""
    length = SEQUENCE_QUANTUM * math.ceil((longest + 1) / SEQUENCE_QUANTUM)
    return max(rows, math.ceil(MIN_BATCH_TOKENS / length)), length


class LowPrecisionStoredLinear(torch.nn.Linear):
    """A frozen Linear whose weights are stored in the autocast dtype. Under autocast it is a
    plain Linear (autocast would compute it with exactly these weights). Outside autocast — a
    finite difference in ``Policy.full_precision()`` — it computes in the input's precision
    from the same rounded weights, where a plain Linear would refuse the mixed dtypes."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == input.dtype or torch.is_autocast_enabled(input.device.type):
            return super().forward(input)
        bias = None if self.bias is None else self.bias.to(input.dtype)
        return torch.nn.functional.linear(input, self.weight.to(input.dtype), bias)


def cast_frozen_linears(module: torch.nn.Module, dtype: torch.dtype | None) -> int:
    """Store the weights of ``module``'s frozen Linear layers in ``dtype`` (the autocast dtype),
    so that autocast stops casting them again at every forward pass. The numbers do not change:
    autocast computes a Linear with exactly these bf16 weights. Trainable layers keep their fp32
    master weights; a weight tied to the input embeddings (an LM head) is left alone, since the
    embedding lookup is not autocast and must keep its precision. Returns how many were cast.

    Measured on SmolLM2-135M + LoRA (issue 16): recasting the frozen base at every forward
    pass cost a fifth of an adaptation step on CPU.
    """
    if dtype is None:
        return 0
    embeddings = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    tied = {id(embeddings.weight)} if embeddings is not None else set()
    cast = 0
    for layer in module.modules():
        # exactly nn.Linear: a subclass's own forward would not know the stored dtype
        if type(layer) is not torch.nn.Linear or layer.weight.requires_grad:
            continue
        if id(layer.weight) in tied or layer.weight.dtype == dtype:
            continue
        layer.weight.data = layer.weight.data.to(dtype)
        if layer.bias is not None and not layer.bias.requires_grad:
            layer.bias.data = layer.bias.data.to(dtype)
        layer.__class__ = LowPrecisionStoredLinear
        cast += 1
    return cast
