"""Which precision a model computes in, by hardware and setting."""

from __future__ import annotations

import pytest
import torch

from training import precision
from training.precision import Precision, canonical_rows_and_length, resolve_precision

CPU = torch.device("cpu")


@pytest.mark.parametrize(("units", "setting", "expected"), [
    (True, "auto", Precision(torch.float32, torch.bfloat16)),  # AMX/avx512_bf16: bf16 matmuls
    (False, "auto", Precision(torch.float32)),  # no bf16 units: emulated bf16 would be slower
    (True, "float32", Precision(torch.float32)),
    (False, "bfloat16", Precision(torch.float32, torch.bfloat16)),  # asked for: autocast
    (True, "float64", Precision(torch.float64)),
])
def test_cpu_precision_follows_the_hardware_and_the_setting(monkeypatch, units, setting, expected):
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: units)
    assert resolve_precision(setting, CPU) == expected


def test_mixed_precision_only_where_bf16_units_exist(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: False)
    assert precision.mixed_precision(CPU, True) is None
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: True)
    assert precision.mixed_precision(CPU, True) is torch.bfloat16
    assert precision.mixed_precision(CPU, False) is None
    # what a benchmark's results file records for the trainers' default switch
    assert precision.training_precision_name(CPU) == "bfloat16 autocast"
    assert precision.training_precision_name(CPU, bf16=False) == "float32"
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: False)
    assert precision.training_precision_name(CPU) == "float32"


def test_canonical_shapes() -> None:
    assert canonical_rows_and_length(1, 80) == (6, 96)  # ≥ 1 pad, a multiple of 32, ≥ 512 tokens
    assert canonical_rows_and_length(1, 96) == (4, 128)
    assert canonical_rows_and_length(64, 100) == (64, 128)
    assert precision.Precision(torch.float32, torch.bfloat16).name == "bfloat16 autocast"
    assert precision.Precision(torch.float32).name == "float32"
