"""End to end at T = 1: the first speculated tokens follow the target's exact distribution."""
import numpy as np
import torch
from scipy.stats import chisquare

from specplug.drafters.draft_model import DraftModelDrafter
from specplug.drafters.ngram import NgramDrafter
from specplug.engine.embedded import EmbeddedEngine
from specplug.engine.rows import Request
from specplug.models.tiny import build_tiny_llama, perturbed_copy
from specplug.types import SamplingParams

DRAWS = 3000


def _exact_second_token_marginal(model, prompt, params):
    """P(t2) = sum over t1 of p(t1 | prompt) p(t2 | prompt, t1), computed exactly."""
    from specplug.sampling import probs_from_logits
    vocab = model.config.vocab_size
    with torch.no_grad():
        p1 = probs_from_logits(model(torch.tensor([prompt])).logits[0, -1], params)
        seqs = torch.tensor([prompt + [t] for t in range(vocab)])
        p2 = probs_from_logits(model(seqs).logits[:, -1], params)  # [vocab(t1), vocab(t2)]
    return (p1[:, None] * p2).sum(0).numpy()


def _run(model, drafter, prompt, params):
    reqs = [Request(prompt, max_new_tokens=3, seed=s) for s in range(DRAWS)]
    outputs, _ = EmbeddedEngine(model, None, drafter, 3, params).generate(reqs, batch_size=100)
    return [o.output_token_ids for o in outputs]


def _gof(counts, probs):
    exp = probs * counts.sum()
    keep = exp > 5
    obs = np.append(counts[keep], counts[~keep].sum())
    e = np.append(exp[keep], exp[~keep].sum())
    if e[-1] < 1e-9:
        obs, e = obs[:-1], e[:-1]
    return chisquare(obs, e).pvalue


def test_second_token_distribution_with_speculation():
    params = SamplingParams(temperature=1.0)
    target = build_tiny_llama(seed=0, sharpness=1.5)  # flatter, so many tokens are in play
    prompt = [10, 20, 30, 40, 50]
    for drafter in (DraftModelDrafter(perturbed_copy(target, 0.5), 256), NgramDrafter()):
        outs = _run(target, drafter, prompt, params)
        # the first token comes from prefill; the second is the first one speculation decides
        counts = np.bincount([o[1] for o in outs], minlength=256).astype(float)
        p_value = _gof(counts, _exact_second_token_marginal(target, prompt, params))
        assert p_value > 0.01, f"{type(drafter).__name__}: p={p_value:.2e}"
