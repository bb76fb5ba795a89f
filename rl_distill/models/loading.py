"""Load teachers and students from Hugging Face paths or built-in names, and check tokenizers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rl_distill.models.builtin import BUILTIN_MODELS, SMOLLM2_NAME, ensure_smollm2

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TokenizerMismatchError(ValueError):
    """Teacher and student do not share a tokenizer, so their token ids mean different things."""


#: How to distil across tokenizers anyway; every tokenizer-mismatch message ends with it.
CROSS_TOKENIZER_HINT = "to distil across tokenizers, set model.cross_tokenizer: uld with agent.name: uld (rl_distill.cross_tokenizer)"


class CorruptWeightsError(ValueError):
    """A weights file is truncated or not a valid checkpoint file (an interrupted download or copy)."""


# What a checkpoint folder needs, as (description, file-name patterns): weights and a tokenizer.
_WEIGHTS = (
    "weights (model.safetensors or pytorch_model.bin)",
    ("*.safetensors", "*.bin", "*.index.json", "*.h5", "*.msgpack", "*.gguf"),
)
_TOKENIZER = (
    "tokenizer files (tokenizer.json, tokenizer.model or vocab.*)",
    ("tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json", "*.model", "*.tiktoken"),
)


def _has_any(folder: Path, patterns: tuple[str, ...]) -> bool:
    return any(any(folder.glob(pattern)) for pattern in patterns)


def _check_folder_has(folder: Path, name_or_path: str, part: tuple[str, tuple[str, ...]]) -> None:
    """Fail naming the folder when it has no file of ``part``, listing everything it lacks.

    Raises:
        FileNotFoundError: e.g. "model folder 'x' has no tokenizer files (...) and no weights (...)".
    """
    if _has_any(folder, part[1]):
        return
    missing = [what for what, patterns in (_TOKENIZER, _WEIGHTS) if not _has_any(folder, patterns)]
    files = sorted(p.name for p in folder.iterdir())
    holds = f"; it holds only {', '.join(files)}" if len(files) <= 5 else ""
    raise FileNotFoundError(f"model folder {name_or_path!r} has no {' and no '.join(missing)}{holds}")


def check_safetensors_file(path: Path) -> None:
    """Read a ``.safetensors`` header and check that the file holds every byte it declares.

    Raises:
        CorruptWeightsError: naming the file: truncated, or a header that cannot be parsed.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header_bytes = f.read(header_len) if 8 + header_len <= size else None
    if size < 8 or header_bytes is None:
        raise CorruptWeightsError(
            f"weights file {str(path)!r} is truncated ({size} bytes, the header is cut off)"
        )
    try:
        header = json.loads(header_bytes)
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        raise CorruptWeightsError(
            f"weights file {str(path)!r} is not a valid safetensors file (bad header)"
        ) from None
    if size < 8 + header_len + end:
        raise CorruptWeightsError(
            f"weights file {str(path)!r} is truncated: {size} bytes, but its header describes "
            f"{8 + header_len + end} (an interrupted download or copy?)"
        )


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map ``"float32" | "bfloat16" | "float16"`` (or a torch dtype) to a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def resolve_model_path(name_or_path: str) -> str:
    """Turn a built-in name into its cached checkpoint folder; pass other names through.

    A string that looks like a local path (absolute, ``./``, ``~``) must exist; anything else is
    handed to Transformers as a hub id, which only works offline if it is already in the HF cache.

    Raises:
        FileNotFoundError: for a local path that does not exist.
    """
    if name_or_path in BUILTIN_MODELS:
        if name_or_path == SMOLLM2_NAME:
            return str(ensure_smollm2())
    looks_local = name_or_path.startswith(("/", "./", "../", "~")) or Path(name_or_path).exists()
    if looks_local:
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model path {name_or_path!r} does not exist")
        if path.is_dir() and not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model path {name_or_path!r} has no config.json: not a Hugging Face checkpoint"
            )
        return str(path)
    return name_or_path


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer and give it a pad token (the EOS token) if it has none."""
    path = resolve_model_path(name_or_path)
    if Path(path).is_dir():
        _check_folder_has(Path(path), name_or_path, _TOKENIZER)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:  # Transformers' messages span lines; keep one
        raise FileNotFoundError(
            f"could not load a tokenizer from {name_or_path!r}: {_one_line(err)}"
        ) from err
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer of {name_or_path!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    tokenizer.name_or_path = name_or_path
    return tokenizer


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> PreTrainedModel:
    """Load any ``AutoModelForCausalLM`` checkpoint, or a built-in name such as ``smollm2-135m-instruct``.

    Args:
        name_or_path: built-in name, local folder, or hub id already present in the local HF cache.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        device: where to put the model.
        trust_remote_code: off unless the user asks; custom modelling code runs only then.
        **kwargs: passed to ``from_pretrained``.

    Raises:
        FileNotFoundError: missing path or a folder that is not a checkpoint (no weights).
        CorruptWeightsError: a truncated or unreadable weights file, named.
    """
    path = resolve_model_path(name_or_path)
    folder = Path(path)
    if folder.is_dir() and "gguf_file" not in kwargs:
        _check_folder_has(folder, name_or_path, _WEIGHTS)
        for file in sorted(folder.glob("*.safetensors")):
            check_safetensors_file(file)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code, **kwargs
        )
    except OSError as err:
        raise FileNotFoundError(
            f"could not load a causal LM from {name_or_path!r}: {_one_line(err)}"
        ) from err
    except SafetensorError as err:
        raise CorruptWeightsError(
            f"could not read the weights of {name_or_path!r}: {_one_line(err)}"
        ) from err
    return model.to(device)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


@dataclass(frozen=True)
class VocabInfo:
    """Sizes that matter when teacher and student share a tokenizer.

    Attributes:
        vocab_size: number of real tokens (``len(tokenizer)``); logits are cut to this width so
            padding rows of the embedding matrix are never sampled nor scored.
        teacher_width: the teacher's logit width (``config.vocab_size``), ``>= vocab_size``.
        student_width: the student's logit width, ``>= vocab_size``.
    """

    vocab_size: int
    teacher_width: int
    student_width: int


def logit_width(model: PreTrainedModel) -> int:
    """Width of the model's output logits (its output embedding rows)."""
    out = model.get_output_embeddings()
    if out is not None and hasattr(out, "weight"):
        return int(out.weight.shape[0])
    return int(model.config.vocab_size)


def _describe(tokenizer: PreTrainedTokenizerBase) -> str:
    return (
        f"{getattr(tokenizer, 'name_or_path', '?')!r} ({type(tokenizer).__name__}, {len(tokenizer)} tokens)"
    )


def check_tokenizers_match(
    teacher_tokenizer: PreTrainedTokenizerBase, student_tokenizer: PreTrainedTokenizerBase
) -> None:
    """Fail before any work if teacher and student tokenise differently.

    Compares the full token-to-id maps and the special tokens (EOS, pad is not compared since
    we may have set it ourselves).

    Raises:
        TokenizerMismatchError: naming both vocabularies and the first difference found.
    """
    if teacher_tokenizer is student_tokenizer:
        return
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    where = (
        f"teacher tokenizer {_describe(teacher_tokenizer)} vs student tokenizer {_describe(student_tokenizer)}"
        f" ({CROSS_TOKENIZER_HINT})"
    )
    if len(t_vocab) != len(s_vocab):
        raise TokenizerMismatchError(
            f"teacher and student must share a tokenizer, but the vocabulary sizes differ: {where}"
        )
    if t_vocab != s_vocab:
        diff = next(tok for tok, idx in t_vocab.items() if s_vocab.get(tok) != idx)
        student_side = "is missing" if diff not in s_vocab else f"has id {s_vocab[diff]}"
        raise TokenizerMismatchError(
            f"teacher and student must share a tokenizer, but token {diff!r} has id {t_vocab[diff]} for the "
            f"teacher and {student_side} for the student: {where}"
        )
    if teacher_tokenizer.eos_token_id != student_tokenizer.eos_token_id:
        raise TokenizerMismatchError(
            f"teacher and student tokenizers have different EOS ids ({teacher_tokenizer.eos_token_id} vs "
            f"{student_tokenizer.eos_token_id}): {where}"
        )


def check_pair(
    teacher: PreTrainedModel, student: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> VocabInfo:
    """Check that both models can score every token of ``tokenizer``; return the shared sizes.

    Raises:
        TokenizerMismatchError: if either model's logit width is smaller than the tokenizer's vocabulary.
    """
    vocab = len(tokenizer)
    t_width, s_width = logit_width(teacher), logit_width(student)
    for role, width in (("teacher", t_width), ("student", s_width)):
        if width < vocab:
            raise TokenizerMismatchError(
                f"the {role} has {width} output logits but the tokenizer {_describe(tokenizer)} has {vocab} tokens"
            )
    return VocabInfo(vocab_size=vocab, teacher_width=t_width, student_width=s_width)
