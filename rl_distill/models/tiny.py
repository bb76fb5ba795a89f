"""Tiny from-scratch models and a character-level tokenizer, for tests and fast CPU experiments."""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
#: Printable ASCII (letters, digits, punctuation, space) plus newline.
DEFAULT_CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"


def char_tokenizer(chars: str = DEFAULT_CHARS) -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer: ids 0-3 are ``<pad> <bos> <eos> <unk>``, then one id per char.

    It saves and loads with ``save_pretrained``/``AutoTokenizer.from_pretrained`` like any other.

    Args:
        chars: the alphabet; duplicates are dropped, order kept.
    """
    alphabet = list(dict.fromkeys(chars))
    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK, *alphabet])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Split into single characters, spaces and newlines included.
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    from tokenizers import decoders

    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK, padding_side="left"
    )
    fast.name_or_path = "char-tokenizer"
    return fast


def tiny_llama(
    vocab_size: int,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    pad_token_id: int = 0,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
) -> LlamaForCausalLM:
    """A small randomly initialised Llama causal LM (float32, eager-free SDPA attention).

    Args:
        vocab_size: logit width; may exceed the tokenizer's vocabulary to test padding rows.
        hidden_size: model width.
        num_layers: decoder blocks.
        num_heads: attention heads (``hidden_size`` must be divisible by it).
        intermediate_size: MLP width, default ``4 * hidden_size``.
        max_position_embeddings: context length.
        seed: seed for the initial weights (the global RNG is left untouched).
        tie_word_embeddings: share input and output embeddings.
        pad_token_id: pad id.
        bos_token_id: BOS id.
        eos_token_id: EOS id.
    """
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()
