"""``nli``: textual-entailment reward from any Hugging Face sequence-classification NLI model.

The premise is the source (metadata ``source``), the hypothesis is the completion, and the reward is
the model's probability that the premise entails the hypothesis. Sources longer than the model's
context are split into sentence chunks and scored the SummaC-ZS way (Laban et al., 2022): for every
completion sentence take the best-entailing source chunk, then average over completion sentences.
"""

from __future__ import annotations

import inspect
import os
import re
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch

Granularity = Literal["auto", "sentence", "document"]

# Split after ., ! or ? followed by whitespace; short and predictable, and good enough for the
# templated passages and model outputs this library scores (no abbreviation handling).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences on ``.``, ``!`` or ``?`` followed by whitespace; drops empty pieces."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def find_label_index(id2label: dict[int, str], label: str) -> int:
    """The class index whose name equals ``label`` case-insensitively.

    Raises:
        ValueError: no such label; the message lists the model's labels.
    """
    matches = [int(i) for i, name in id2label.items() if str(name).casefold() == label.casefold()]
    if len(matches) != 1:
        labels = ", ".join(f"{i}={name!r}" for i, name in sorted((int(i), n) for i, n in id2label.items()))
        problem = "no label" if not matches else "several labels"
        raise ValueError(
            f"the NLI model has {problem} named {label!r} (case-insensitive) in config.id2label: {labels}; "
            "pass entailment_label= with the name the model uses"
        )
    return matches[0]


class NLIEntailmentReward:
    """Reward = P(source entails completion) under a sequence-classification NLI model.

    Scoring (``granularity``):

    - ``"document"``: one (source, completion) pair; a pair longer than ``max_length`` tokens is
      truncated (longest sequence first).
    - ``"sentence"``: SummaC-ZS aggregation. The source is cut into chunks of ``chunk_sentences``
      consecutive sentences and the completion into sentences; the score is
      ``mean over completion sentences of max over source chunks of score(chunk, sentence)``.
    - ``"auto"`` (default): ``"document"`` when the whole pair fits in ``max_length`` tokens, else
      ``"sentence"``.

    The pair score is the softmax probability of the entailment class (``hard=True``: 1.0 if it is the
    argmax, else 0.0). The entailment class is found by name in ``config.id2label``, so models with
    any label order work. An empty completion scores 0.0 without calling the model.

    Truncation is never silent: every truncated pair increments :attr:`num_truncated` (cumulative) and
    :attr:`last_num_truncated` (last call), and a call that truncated anything emits a warning.

    Args:
        model: a model path or hub-style directory, a loaded ``PreTrainedModel``, or a
            ``(model, tokenizer)`` tuple.
        tokenizer: the tokenizer (or its path) when ``model`` is a loaded model; default: loaded from
            ``model`` when it is a path.
        entailment_label: the entailment class name in ``config.id2label``.
        hard: score 1.0/0.0 by argmax instead of the probability.
        granularity: ``"auto"``, ``"sentence"`` or ``"document"``, see above.
        chunk_sentences: source sentences per chunk in sentence mode.
        batch_size: pairs per forward pass.
        max_length: token limit per pair; default ``tokenizer.model_max_length`` when it is set, else
            ``config.max_position_embeddings``, else 512.
        premise_key: metadata key holding the premises; ``None`` uses the prompts as premises.
        device: move the model there (default: leave it where it is).
    """

    name = "nli"

    def __init__(
        self,
        model: str | os.PathLike[str] | Any,
        tokenizer: Any = None,
        *,
        entailment_label: str = "entailment",
        hard: bool = False,
        granularity: Granularity = "auto",
        chunk_sentences: int = 1,
        batch_size: int = 16,
        max_length: int | None = None,
        premise_key: str | None = "source",
        device: str | torch.device | None = None,
    ) -> None:
        if granularity not in ("auto", "sentence", "document"):
            raise ValueError(f"granularity must be auto, sentence or document, got {granularity!r}")
        if batch_size < 1 or chunk_sentences < 1:
            raise ValueError(
                f"batch_size and chunk_sentences must be >= 1, got {batch_size}, {chunk_sentences}"
            )
        self.model, self.tokenizer = _load(model, tokenizer)
        if device is not None:
            self.model.to(device)
        self.model.eval()
        self.entailment_index = find_label_index(self.model.config.id2label, entailment_label)
        self.hard = hard
        self.granularity = granularity
        self.chunk_sentences = chunk_sentences
        self.batch_size = batch_size
        self.max_length = max_length or _default_max_length(self.model, self.tokenizer)
        self.premise_key = premise_key
        self.num_truncated = 0
        self.last_num_truncated = 0
        # Only pass the inputs the model's forward accepts (e.g. no token_type_ids for DistilBERT).
        self._forward_args = set(inspect.signature(self.model.forward).parameters)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **metadata: Any) -> list[float]:
        """Entailment score of each completion given its premise (see the class docstring)."""
        premises = self._premises(prompts, metadata)
        self.last_num_truncated = 0
        # Collect every (premise, hypothesis) pair of the batch first, so that they share forward passes.
        pairs: list[tuple[str, str]] = []
        plans: list[tuple[int, int, int] | None] = []  # per completion: (first pair, n chunks, n sentences)
        for premise, completion in zip(premises, completions, strict=True):
            if not completion.strip():
                plans.append(None)
                continue
            chunks, sentences = self._split(premise, completion)
            plans.append((len(pairs), len(chunks), len(sentences)))
            pairs.extend((chunk, sentence) for sentence in sentences for chunk in chunks)
        scores = self.score_pairs([p for p, _ in pairs], [h for _, h in pairs]) if pairs else []
        if self.last_num_truncated:
            warnings.warn(
                f"NLIEntailmentReward truncated {self.last_num_truncated} of {len(pairs)} premise/hypothesis "
                f"pairs to max_length={self.max_length} tokens; scores of truncated pairs may be wrong",
                stacklevel=2,
            )
        return [0.0 if plan is None else _aggregate(scores, *plan) for plan in plans]

    def _premises(self, prompts: Sequence[str], metadata: dict[str, Any]) -> list[str]:
        if self.premise_key is None:
            return list(prompts)
        if self.premise_key not in metadata:
            raise ValueError(
                f"nli needs the premises as metadata {self.premise_key!r} "
                f"(got {sorted(metadata)}); set premise_key=None to use the prompts"
            )
        return [str(p) for p in metadata[self.premise_key]]

    def _split(self, premise: str, completion: str) -> tuple[list[str], list[str]]:
        """Source chunks and completion pieces for one pair, according to ``granularity``."""
        if self.granularity == "document" or (
            self.granularity == "auto" and self._num_tokens(premise, completion) <= self.max_length
        ):
            return [premise], [completion]
        source_sentences = split_sentences(premise) or [premise]
        k = self.chunk_sentences
        chunks = [" ".join(source_sentences[i : i + k]) for i in range(0, len(source_sentences), k)]
        return chunks, split_sentences(completion) or [completion]

    def _num_tokens(self, premise: str, hypothesis: str) -> int:
        return len(self.tokenizer(premise, hypothesis, truncation=False)["input_ids"])

    @torch.inference_mode()
    def score_pairs(self, premises: Sequence[str], hypotheses: Sequence[str]) -> list[float]:
        """Entailment score of each (premise, hypothesis) pair, in batches of ``batch_size``.

        Truncated pairs are counted in :attr:`num_truncated` and :attr:`last_num_truncated`.
        """
        lengths = [self._num_tokens(p, h) for p, h in zip(premises, hypotheses, strict=True)]
        truncated = sum(n > self.max_length for n in lengths)
        self.num_truncated += truncated
        self.last_num_truncated += truncated
        # Batch pairs of similar length together so that little compute goes to padding.
        order = sorted(range(len(premises)), key=lambda i: lengths[i])
        scores = [0.0] * len(premises)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch_scores = self._score_batch([premises[i] for i in idx], [hypotheses[i] for i in idx])
            for i, s in zip(idx, batch_scores, strict=True):
                scores[i] = s
        return scores

    def _score_batch(self, premises: list[str], hypotheses: list[str]) -> list[float]:
        # Right padding: encoder classifiers use absolute positions from 0, so left padding would shift
        # them and make a pair's score depend on its batch.
        enc = self.tokenizer(
            premises,
            hypotheses,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            padding_side="right",
            return_tensors="pt",
        )
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in enc.items() if k in self._forward_args}
        logits = self.model(**inputs).logits.float()  # (B, num_labels)
        if self.hard:
            return (logits.argmax(dim=-1) == self.entailment_index).float().tolist()
        return logits.softmax(dim=-1)[:, self.entailment_index].tolist()


def _aggregate(scores: list[float], first: int, num_chunks: int, num_sentences: int) -> float:
    """SummaC-ZS: mean over completion sentences of the max over source chunks.

    Pairs are laid out sentence-major: ``scores[first + j * num_chunks + i]`` is (chunk i, sentence j).
    """
    best = [max(scores[first + j * num_chunks : first + (j + 1) * num_chunks]) for j in range(num_sentences)]
    return sum(best) / num_sentences


def _load(model: Any, tokenizer: Any) -> tuple[Any, Any]:
    """Resolve ``model``/``tokenizer`` arguments into a loaded (model, tokenizer) pair."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if isinstance(model, tuple):
        if len(model) != 2 or tokenizer is not None:
            raise ValueError("pass either model=(model, tokenizer) or model and tokenizer, not both")
        model, tokenizer = model
    if isinstance(model, str | os.PathLike):
        path = os.fspath(model)
        model = AutoModelForSequenceClassification.from_pretrained(path)
        tokenizer = tokenizer if tokenizer is not None else path
    if tokenizer is None:
        raise ValueError(
            "a loaded NLI model needs its tokenizer: pass tokenizer= or model=(model, tokenizer)"
        )
    if isinstance(tokenizer, str | os.PathLike):
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer))
    if not getattr(model.config, "id2label", None):
        raise ValueError("the NLI model's config has no id2label, so the entailment class cannot be found")
    return model, tokenizer


def _default_max_length(model: Any, tokenizer: Any) -> int:
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:  # unset limits are a huge sentinel (1e30)
        return limit
    positions = getattr(model.config, "max_position_embeddings", None)
    return int(positions) if positions else 512
