"""The student's sparse-gradient embedding lookup (engine.sparse_grad_embeddings): same gradients, dense .grad."""

import pytest
import torch

from rl_distill.models import tiny_llama
from rl_distill.rollout import RolloutEngine, SamplingConfig
from rl_distill.rollout import engine as engine_mod
from rl_distill.rollout.engine import sparse_grad_embeddings

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["1+2=", "hello there", "x", "7*8?"]


def tied(tokenizer, seed=0):
    return tiny_llama(len(tokenizer), hidden_size=32, num_layers=2, seed=seed, tie_word_embeddings=True)


def grads_of(engine, rollout):
    engine.student.zero_grad(set_to_none=True)
    logits = engine.score_student(rollout)  # (B, T, V) with gradient
    logp = logits.log_softmax(-1).gather(-1, rollout.completion_ids[..., None]).squeeze(-1)
    (logp * rollout.completion_mask).sum().backward()
    return {n: p.grad.clone() for n, p in engine.student.named_parameters()}


def test_tied_embeddings_same_gradients_dense_and_padding_rows_zero(monkeypatch, tokenizer, teacher):
    student = tied(tokenizer)
    assert student.get_input_embeddings().weight is student.get_output_embeddings().weight
    assert student.get_input_embeddings().padding_idx == 0
    calls = []
    real = engine_mod._SparseGradEmbedding.apply
    monkeypatch.setattr(engine_mod._SparseGradEmbedding, "apply", lambda *a: calls.append(1) or real(*a))
    sparse = RolloutEngine(student, teacher, tokenizer)
    dense = RolloutEngine(student, teacher, tokenizer, sparse_embedding_grad=False)
    rollout = sparse.generate(
        PROMPTS, SamplingConfig(max_new_tokens=8), generator=torch.Generator().manual_seed(0)
    )
    assert int((rollout.input_ids == 0).sum()) > 0  # left padding: padding_idx rows are looked up
    got = grads_of(sparse, rollout)
    assert len(calls) == 1
    ref = grads_of(dense, rollout)
    assert len(calls) == 1
    for name in ref:
        assert got[name].layout == torch.strided, name  # what AdamW (fused) needs
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)
    # A fused AdamW step takes the dense sum.
    torch.optim.AdamW(student.parameters(), lr=1e-3, fused=True).step()


def test_lookup_gradient_alone_equals_f_embedding():
    weight = torch.randn(12, 5, requires_grad=True)
    ids = torch.tensor([[0, 3, 3, 7], [1, 0, 11, 3]])
    g = torch.randn(2, 4, 5)
    out = engine_mod._SparseGradEmbedding.apply(ids, weight, 0)
    (sparse,) = torch.autograd.grad(out, weight, g)
    assert sparse.is_sparse
    ref = torch.nn.functional.embedding(ids, weight, padding_idx=0)
    (dense,) = torch.autograd.grad(ref, weight, g)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(sparse.to_dense(), dense)
    assert sparse.to_dense()[0].abs().sum() == 0  # padding row: no gradient


def test_not_applied_where_it_must_not(tokenizer, student):
    ids = torch.tensor([[5, 6, 7]])
    assert student.get_input_embeddings().weight is not student.get_output_embeddings().weight
    assert sparse_grad_embeddings(student, ids) is None  # untied: the lookup's gradient would stay sparse
    model = tied(tokenizer)
    assert sparse_grad_embeddings(model, ids) is not None
    with torch.no_grad():
        assert sparse_grad_embeddings(model, ids) is None
    model.get_input_embeddings().weight.requires_grad_(False)  # frozen (LoRA)
    assert sparse_grad_embeddings(model, ids) is None
    model.get_input_embeddings().weight.requires_grad_(True)
    model.get_input_embeddings().max_norm = 1.0  # renormalising lookups: left to the model
    assert sparse_grad_embeddings(model, ids) is None
    assert sparse_grad_embeddings(torch.nn.Linear(2, 2), ids) is None
