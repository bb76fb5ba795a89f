"""Model loading: Hugging Face causal LMs, the offline SmolLM2 teacher, kept-layer and tiny students."""

from rl_distill.models.builtin import (
    BUILTIN_MODELS,
    SMOLLM2_NAME,
    cache_dir,
    ensure_smollm2,
    smollm2_gguf_path,
)
from rl_distill.models.loading import (
    TokenizerMismatchError,
    VocabInfo,
    check_pair,
    check_tokenizers_match,
    load_causal_lm,
    load_tokenizer,
    logit_width,
    resolve_dtype,
    resolve_model_path,
)
from rl_distill.models.process_lm import ProcessLM as ProcessLM
from rl_distill.models.students import (
    evenly_spaced_layers,
    find_decoder_layers,
    make_kept_layer_student,
    student_from_config,
)
from rl_distill.models.tiny import char_tokenizer, tiny_llama

__all__ = [
    "BUILTIN_MODELS",
    "SMOLLM2_NAME",
    "TokenizerMismatchError",
    "VocabInfo",
    "cache_dir",
    "char_tokenizer",
    "check_pair",
    "check_tokenizers_match",
    "ensure_smollm2",
    "evenly_spaced_layers",
    "find_decoder_layers",
    "load_causal_lm",
    "load_tokenizer",
    "logit_width",
    "make_kept_layer_student",
    "resolve_dtype",
    "resolve_model_path",
    "smollm2_gguf_path",
    "student_from_config",
    "tiny_llama",
]
