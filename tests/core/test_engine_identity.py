"""Greedy speculative output equals the target alone, for each drafter of the foundation, at
batch 1 and batch 4 with mixed prompt lengths (tiny float64 models)."""
import pytest
import torch

from specplug.drafters.draft_model import DraftModelDrafter
from specplug.drafters.ngram import NgramDrafter
from specplug.engine.embedded import EmbeddedEngine
from specplug.engine.rows import Request
from specplug.models.tiny import build_tiny_llama, build_tiny_tokenizer, perturbed_copy
from specplug.vocab import TextBridge

NUM_PROMPTS = 20


@pytest.fixture(scope="module")
def target():
    return build_tiny_llama(seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def requests():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 40, (NUM_PROMPTS,), generator=gen).tolist()
    reqs = []
    for i, n in enumerate(lengths):
        # half the prompts repeat themselves so n-gram lookup has something to find
        body = torch.randint(1, 256, (n,), generator=gen).tolist()
        reqs.append(Request(body + body[: n // 2] if i % 2 else body, max_new_tokens=24 + i % 7))
    return reqs


@pytest.fixture(scope="module")
def plain(target, tokenizer, requests):
    outputs, _ = EmbeddedEngine(target, tokenizer).generate(requests, batch_size=1)
    return [o.output_token_ids for o in outputs]


def _drafters(target, tokenizer):
    return {
        "ngram": lambda: NgramDrafter(),
        "draft_same": lambda: DraftModelDrafter(build_tiny_llama(seed=0), 256),
        "draft_noisy": lambda: DraftModelDrafter(perturbed_copy(target, 0.3), 256),
        # a draft with a padded vocabulary (same tokenizer, extra unused ids)
        "draft_padded_vocab": lambda: DraftModelDrafter(build_tiny_llama(seed=0, vocab_size=320), 256),
        # a draft with ANOTHER tokenizer: re-tokenised through text
        "draft_other_tokenizer": lambda: DraftModelDrafter(
            build_tiny_llama(seed=3, vocab_size=300), 256,
            TextBridge(tokenizer, _other_tokenizer())),
    }


def _other_tokenizer():
    from specplug.models.tiny import build_tiny_tokenizer
    return build_tiny_tokenizer(vocab_size=300)


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("name", ["ngram", "draft_same", "draft_noisy", "draft_padded_vocab",
                                  "draft_other_tokenizer"])
def test_greedy_identity(name, batch_size, target, tokenizer, requests, plain):
    drafter = _drafters(target, tokenizer)[name]()
    outputs, stats = EmbeddedEngine(target, tokenizer, drafter, num_draft_tokens=4).generate(
        requests, batch_size=batch_size)
    assert [o.output_token_ids for o in outputs] == plain
    assert stats.num_draft_tokens > 0
    if name == "draft_same":
        # a drafter equal to the target accepts everything: tau = gamma + 1 but for the
        # steps cut short by max_new_tokens
        assert stats.acceptance_rate > 0.99
        assert stats.mean_accept_length > 4.0


def test_accept_lengths_add_up(target, tokenizer, requests, plain):
    outputs, stats = EmbeddedEngine(target, tokenizer, NgramDrafter(), 4).generate(requests, 4)
    for o in outputs:
        # the first token comes from prefill; every other token from a verify step
        assert sum(o.accept_lengths) + 1 == o.num_new_tokens
        assert all(1 <= a <= 5 for a in o.accept_lengths)
    assert stats.total_new_tokens == sum(len(p) for p in plain)


def test_stop_string_inside_accepted_block_ends_the_row(target, tokenizer):
    prompt = tokenizer.encode("the cat sat on the mat. the cat")
    plain, _ = EmbeddedEngine(target, tokenizer).generate([Request(prompt, 30)])
    text = plain[0].output_text
    assert len(text) > 6
    stop = text[3:6]  # a stop string that appears a few tokens in
    req = Request(prompt, 30, stop=(stop,))
    base, _ = EmbeddedEngine(target, tokenizer).generate([req])
    spec, _ = EmbeddedEngine(target, tokenizer, DraftModelDrafter(build_tiny_llama(seed=0), 256),
                             num_draft_tokens=5).generate([req])
    assert spec[0].finish_reason == base[0].finish_reason == "stop"
    assert spec[0].output_token_ids == base[0].output_token_ids
    assert stop not in spec[0].output_text and len(spec[0].output_token_ids) < 30


def test_eos_ends_row(tokenizer):
    model = build_tiny_llama(seed=4)
    prompt = [5, 6, 7, 8]
    plain, _ = EmbeddedEngine(model, tokenizer).generate([Request(prompt, 20)])
    eos = plain[0].output_token_ids[5]  # pretend the 6th generated token is EOS
    model.generation_config.eos_token_id = eos
    for drafter in (None, DraftModelDrafter(build_tiny_llama(seed=4), 256)):
        out, _ = EmbeddedEngine(model, tokenizer, drafter, 5).generate([Request(prompt, 20)])
        first = plain[0].output_token_ids.index(eos)
        assert out[0].output_token_ids == plain[0].output_token_ids[:first + 1]
        assert out[0].finish_reason == "eos"
    model.generation_config.eos_token_id = None
