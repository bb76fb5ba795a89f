"""Benchmark-local switches that turn one library optimisation off, to measure what it gains.

Nothing in ``rl_distill`` is edited: a benchmark worker installs a patch as a monkeypatch inside its
own process (``run_ours(..., patches=...)``, method ``ours_recompute``) and undoes it afterwards.

- ``recompute_grad``: the divergences' **old recomputing backward**. Since issue #18 (lever 1)
  ``rl_distill.divergences`` writes the closed-form student gradient inside the forward chunk loop
  whenever the teacher needs no gradient (``_row_value_and_grad`` feeding ``_ChunkedRows``); with
  this patch ``_row_value_and_grad`` returns None, so ``_ChunkedRows`` recomputes every chunk under
  autograd in backward, as before the change. Same values and gradients (to rounding), different
  time and memory: the lever's effect alone.
- ``linear_head``: the decode steps' logits through the model's own ``F.linear`` head instead of
  the few-row product of :mod:`rl_distill.rollout.skinny_head` (the engine's ``skinny_head``
  switched off for every engine): the decode lever alone.
- ``linear_layers``: the decoder layers' linear maps through ``F.linear`` at every row count
  (:data:`rl_distill.rollout.skinny_head.SKINNY_LAYER_MAX_ROWS` set to 0; the engine's
  ``skinny_layers`` off for every engine, the output head still switched): the layer lever alone.
- ``no_prefix_cache``: the teacher scores every row from its first token (the engine's
  ``teacher_prefix_cache`` off, :mod:`rl_distill.rollout.prefix_cache`): lever 4 alone.
- ``dense_embedding_grad``: the student's tokens embedded by the model itself (dense lookup
  gradient) instead of the engine's sparse-gradient lookup (``sparse_grad_embeddings``): the
  memory lever alone.
- ``strided_head_input``: the output head reads Hugging Face's strided ``logits_to_keep`` slice as
  it is (every ``dense_head_input`` block of :mod:`rl_distill.rollout.skinny_head` a no-op): the
  head-input lever alone.
- ``unfused_step``: every model decodes through its own ``forward`` (``FusedSteps.get`` returns None:
  no fused one-token step of :mod:`rl_distill.rollout.fused_step`, no native kernel, no packed-rows
  prefill): the fused-step lever alone.

History (issue #12, #18): ``inverse_cdf_sampling`` (the engine samples by inverse CDF since
07b5d6f), ``small_chunks`` (2**20 elements; the library default is 2**19 since 247e0a2) and the
prototype ``fused_jsd`` (now in the library for every divergence) were removed; the recorded
JSON files that name them stay readable (``benchmarks/report.py`` only reads their numbers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _replace(owner: Any, name: str, replacement: Any) -> Callable[[], None]:
    """Set ``owner.name = replacement``; returns the undo (which puts the original back)."""
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    return lambda: setattr(owner, name, original)


def _returns_none(*args: Any, **kwargs: Any) -> None:
    return None


def patch_recompute_grad() -> Callable[[], None]:
    """Make the divergences take the recomputing backward (no fused gradient); returns the undo."""
    import rl_distill.divergences as div

    return _replace(div, "_row_value_and_grad", _returns_none)


def patch_linear_head() -> Callable[[], None]:
    """Make every ``skinny_output_head`` block a no-op (the model's ``F.linear`` head); returns the undo."""
    import rl_distill.rollout.skinny_head as sh

    return _replace(sh, "supports_skinny_head", lambda model: False)


def patch_linear_layers() -> Callable[[], None]:
    """Make the decoder layers' few-row product never apply (``F.linear`` throughout); returns the undo."""
    import rl_distill.rollout.skinny_head as sh

    return _replace(sh, "SKINNY_LAYER_MAX_ROWS", 0)


def patch_no_prefix_cache() -> Callable[[], None]:
    """Make the teacher's shared-prefix cache always decline (the plain forward); returns the undo."""
    from rl_distill.rollout.prefix_cache import PrefixKVCache

    return _replace(PrefixKVCache, "completion_logits", _returns_none)


def patch_dense_embedding_grad() -> Callable[[], None]:
    """Make ``sparse_grad_embeddings`` decline (the model's own dense-gradient lookup); returns the undo."""
    import rl_distill.rollout.engine as engine

    return _replace(engine, "sparse_grad_embeddings", _returns_none)


def patch_strided_head_input() -> Callable[[], None]:
    """Make every ``dense_head_input`` block a no-op (the head reads the strided slice); returns the undo."""
    import rl_distill.rollout.skinny_head as sh

    return _replace(sh, "_output_head", _returns_none)


def patch_unfused_step() -> Callable[[], None]:
    """Make ``FusedSteps.get`` decline every model (each decodes through its ``forward``); returns the undo."""
    from rl_distill.rollout.fused_step import FusedSteps

    return _replace(FusedSteps, "get", lambda self, model: None)


#: name -> installer returning an undo callable.
PATCHES: dict[str, Callable[[], Callable[[], None]]] = {
    "recompute_grad": patch_recompute_grad,
    "linear_head": patch_linear_head,
    "linear_layers": patch_linear_layers,
    "no_prefix_cache": patch_no_prefix_cache,
    "dense_embedding_grad": patch_dense_embedding_grad,
    "strided_head_input": patch_strided_head_input,
    "unfused_step": patch_unfused_step,
}


def apply_patches(names: list[str] | tuple[str, ...]) -> Callable[[], None]:
    """Install the named patches; returns one undo for all of them.

    Raises:
        ValueError: an unknown patch name (naming the known ones).
    """
    unknown = [n for n in names if n not in PATCHES]
    if unknown:
        raise ValueError(f"unknown patch(es) {unknown}; choose from {sorted(PATCHES)}")
    undos: list[Any] = [PATCHES[n]() for n in names]

    def undo() -> None:
        for u in reversed(undos):
            u()

    return undo
