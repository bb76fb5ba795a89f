"""Turn prompt strings into left-padded token batches (chat template applied when available)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase


class PromptTooLongError(ValueError):
    """A prompt does not fit in the context together with the completion budget."""


@dataclass
class PromptBatch:
    """Left-padded prompt token ids.

    Attributes:
        input_ids: ``(B, P)`` token ids, left-padded with the pad id.
        attention_mask: ``(B, P)`` 1 for real tokens, 0 for padding.
        texts: the prompt strings, before any chat template.
    """

    input_ids: Tensor
    attention_mask: Tensor
    texts: list[str]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: Sequence[int] | Tensor) -> PromptBatch:
        """The sub-batch of the given rows, re-padded to its own longest prompt."""
        rows_t = torch.as_tensor(rows, dtype=torch.long, device=self.input_ids.device)
        mask = self.attention_mask[rows_t]
        keep = int(mask.sum(-1).max()) if len(rows_t) else 0
        return PromptBatch(
            input_ids=self.input_ids[rows_t][:, self.input_ids.shape[1] - keep :],
            attention_mask=mask[:, mask.shape[1] - keep :],
            texts=[self.texts[int(i)] for i in rows_t],
        )


class PromptEncoder:
    """Tokenise prompts once (cached by string) and pad them on the left.

    Args:
        tokenizer: the shared tokenizer.
        chat_template: ``True`` to wrap each prompt as a user turn with the tokenizer's chat template
            (generation prompt added), ``False`` for raw text, ``None`` for "if the tokenizer has one".
        max_prompt_length: prompts longer than this many tokens raise :class:`PromptTooLongError`.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        chat_template: bool | None = None,
        max_prompt_length: int | None = None,
    ) -> None:
        has_template = getattr(tokenizer, "chat_template", None) is not None
        if chat_template and not has_template:
            raise ValueError(
                f"chat_template=True but tokenizer {tokenizer.name_or_path!r} has no chat template"
            )
        self.tokenizer = tokenizer
        self.use_chat_template = has_template if chat_template is None else chat_template
        self.max_prompt_length = max_prompt_length
        self._cache: dict[str, list[int]] = {}

    def token_ids(self, prompt: str) -> list[int]:
        """Token ids of one prompt (cached)."""
        ids = self._cache.get(prompt)
        if ids is None:
            if self.use_chat_template:
                ids = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
                )
                if not isinstance(ids, list):  # BatchEncoding in some versions
                    ids = list(ids["input_ids"])
            else:
                ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            if not ids:
                raise ValueError(f"prompt {prompt!r} encodes to zero tokens")
            if self.max_prompt_length is not None and len(ids) > self.max_prompt_length:
                raise PromptTooLongError(
                    f"prompt of {len(ids)} tokens exceeds max_prompt_length={self.max_prompt_length}: {prompt[:80]!r}"
                )
            self._cache[prompt] = ids
        return ids

    def __call__(self, prompts: Sequence[str], device: torch.device | str = "cpu") -> PromptBatch:
        """Encode and left-pad a batch of prompts."""
        if len(prompts) == 0:
            raise ValueError("empty prompt batch")
        seqs = [self.token_ids(p) for p in prompts]
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[row, width - len(s) :] = 1
        return PromptBatch(ids.to(device), mask.to(device), list(prompts))


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding: 0 at each sequence's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
