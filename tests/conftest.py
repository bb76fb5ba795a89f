import pytest
import torch

from rl_distill.models import char_tokenizer, tiny_llama
from rl_distill.rollout import RolloutEngine

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one OpenMP thread avoids hand-off costs that dominate at this size (and a busy machine).

    Use it module-wide with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    return char_tokenizer()


@pytest.fixture
def teacher(tokenizer):
    # Logit width larger than the tokenizer: padding rows must never be sampled nor scored.
    return tiny_llama(len(tokenizer) + 4, hidden_size=32, num_layers=2, seed=1)


@pytest.fixture
def student(tokenizer):
    return tiny_llama(len(tokenizer) + 2, hidden_size=32, num_layers=1, seed=2)


@pytest.fixture
def engine(student, teacher, tokenizer):
    return RolloutEngine(student, teacher, tokenizer)
