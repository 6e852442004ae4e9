"""On the real SmolLM2-135M-Instruct (float32): speculative greedy output equals the target
alone on 8 MT-Bench prompts (one per category), at batch 1 and batch 4 (mixed prompt lengths).

Sized for `make test`'s time limit: the tiny-model tests cover every family and batch shape; this
one shows that nothing breaks on a real checkpoint, its tokenizer and chat template."""
import copy

import pytest
import torch

from specplug.datasets import load_prompts
from specplug.drafters.draft_model import DraftModelDrafter
from specplug.drafters.ngram import NgramDrafter
from specplug.engine.embedded import EmbeddedEngine
from specplug.engine.rows import Request
from specplug.models.loading import load_causal_lm, load_tokenizer

pytestmark = pytest.mark.slow
MAX_NEW = 32


@pytest.fixture(scope="module")
def setup(smollm2):
    model = load_causal_lm(smollm2, torch.float32)
    tok = load_tokenizer(smollm2)
    items = load_prompts("mtbench", None)[::10][:8]  # MT-Bench is 8 categories x 10, in order
    reqs = []
    for it in items:
        text = tok.apply_chat_template([{"role": "user", "content": it.turns[0]}], tokenize=False,
                                       add_generation_prompt=True)
        reqs.append(Request(tok.encode(text, add_special_tokens=False), MAX_NEW))
    plain, _ = EmbeddedEngine(model, tok).generate(reqs, batch_size=1)
    return model, tok, reqs, [o.output_token_ids for o in plain]


def truncated_draft(model, layers: int = 6):
    """SmolLM2's first layers + its norm and lm_head: a real (weak) same-tokenizer draft model."""
    draft = copy.deepcopy(model)
    draft.model.layers = draft.model.layers[:layers]
    draft.config.num_hidden_layers = layers
    return draft


@pytest.mark.parametrize("name,batch_size", [("ngram", 1), ("ngram", 4), ("draft", 4)])
def test_identity(setup, name, batch_size):
    model, tok, reqs, plain = setup
    if name == "ngram":
        drafter, gamma = NgramDrafter(), 5
    else:  # each draft token costs a fifth of a target forward: 3 of them keep the test short
        drafter, gamma = DraftModelDrafter(truncated_draft(model), model.config.vocab_size), 3
    outputs, stats = EmbeddedEngine(model, tok, drafter, gamma).generate(reqs, batch_size=batch_size)
    assert [o.output_token_ids for o in outputs] == plain
    assert stats.num_draft_tokens > 0 and stats.mean_accept_length > 1.0
