"""Every drafter family, end to end in the embedded engine at T > 0: the first 3 generated tokens
follow the target's exact law (conditional chi-square per position, tests/sampling_checks.py).

Each family runs on a tiny target it can draft well (tests/drafters' fixtures), at a temperature
picked so the target's first-token law has about ENTROPY nats: low enough that the drafts are
often accepted, high enough that a biased acceptance rule would show.  DRAWS requests of one
prompt, each with its own seed.  Each case asserts how much was drafted and accepted, so none
passes by never speculating.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
from sampling_checks import conditional_chi_square

from specplug.budget import SpeculationBudget
from specplug.drafters.base import DrafterSpec, build_drafter
from specplug.drafters.draft_model import DraftModelDrafter
from specplug.engine.embedded import EmbeddedEngine
from specplug.engine.rows import Request
from specplug.models.loading import target_info
from specplug.models.tiny import build_tiny_llama, build_tiny_tokenizer, perturbed_copy
from specplug.sampling import probs_from_logits
from specplug.types import SamplingParams
from specplug.vocab import TextBridge

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "drafters"))
import diffusion_fixtures as DF  # noqa: E402
import eagle_fixtures as EF  # noqa: E402

DRAWS = 1000
POSITIONS = 3
GAMMA = 3
ENTROPY = 1.3  # nats of the first token's law at the picked temperature
ALPHA = 1e-3


def pick_temperature(model, prompt) -> float:
    """The temperature whose first-token entropy is closest to ENTROPY."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].double()
    best = None
    for t in (0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0, 30.0, 50.0, 80.0):
        logp = torch.log_softmax(logits / t, -1)
        gap = abs(float(-(logp.exp() * logp).sum()) - ENTROPY)
        if best is None or gap < best[0]:
            best = (gap, t)
    return best[1]


def mixed_budget() -> SpeculationBudget:
    """A budget whose verify costs are fixed (150 ms + 0.25 ms per token, drafting and a
    drafter's catch-up free) rather than measured: on a tiny CPU target measured costs say
    drafting never pays, which is right but would test nothing here.  At 100 rows only rows
    accepting well get drafts, and only as many as their acceptance earns, so lengths differ
    per row and per step.  Drafters that score
    their nodes are taken at their word (no calibration): the tiny heads are sure of drafts the
    target mostly rejects at T > 0, so a calibrated budget rightly stops drafting at once."""
    budget = SpeculationBudget(GAMMA)
    for tokens in (1, 101):
        budget.verify.observe(tokens, 150.0 + 0.25 * tokens)
    budget.observe_verify = lambda tokens, ms: None
    budget.verify.seed = lambda tokens, ms: None  # nor timed at start-up
    budget.observe_draft = lambda tokens, ms: None
    budget.observe_catch_up = lambda tokens, ms: None  # nor a drafter's catch-up
    budget.observe_scores = lambda predicted, accepted: None
    return budget


def target_law(target, prompt, params):
    """prefixes -> the target's next-token law (at params) after prompt + prefix."""
    @torch.inference_mode()
    def law(prefixes):
        return {p: probs_from_logits(target(torch.tensor([list(prompt) + list(p)])).logits[0, -1],
                                     params).double().numpy() for p in set(prefixes)}
    return law


# -- one (target, drafter, prompt) per family ------------------------------------------------------
def _tiny_text_target():
    tok = build_tiny_tokenizer()
    return build_tiny_llama(0), tok, tok.encode("the cat sat on the mat. the cat sat on")


def _self_quoting_prompt():
    """The prompt holds the target's own greedy continuation of its last words, so a lookup
    finds what the target is likely to say next."""
    target, tok, base = _tiny_text_target()
    with torch.no_grad():
        said = target.generate(torch.tensor([base]), max_new_tokens=8, do_sample=False)[0]
    return target, tok, said.tolist() + base


def ngram(tmp):
    target, tok, prompt = _self_quoting_prompt()
    return target, build_drafter(DrafterSpec("ngram"), target_info(target, tok)), prompt


def suffix(tmp):
    """Trees of continuations (several deterministic siblings per node)."""
    target, tok, prompt = _self_quoting_prompt()
    spec = DrafterSpec("suffix", None, {"tree_nodes": 6, "min_prob": 0.0})
    return target, build_drafter(spec, target_info(target, tok)), prompt


def draft(tmp):
    target, tok, prompt = _tiny_text_target()
    return target, DraftModelDrafter(perturbed_copy(target, 0.1), 256), prompt


def draft_other_tokenizer(tmp):
    """The text bridge a draft with another tokenizer goes through (re-tokenised contexts,
    deterministic drafts mapped back by text); the draft's own tokenizer is a second instance,
    so its drafts can agree with the target."""
    target, tok, prompt = _tiny_text_target()
    bridge = TextBridge(tok, build_tiny_tokenizer())
    return target, DraftModelDrafter(perturbed_copy(target, 0.1), 256, bridge), prompt


def _attention_head(tmp, method, state_fn):
    target = EF.attention_only_target(0)
    state, cfg = state_fn(target)
    folder = EF.save_head(os.path.join(tmp, method), state, cfg)
    drafter = build_drafter(DrafterSpec(method if method != "hybrid_head" else "hybrid", folder),
                            target_info(target, None))
    return target, drafter, EF.bos_prompts(1, seed=4)[0]


def eagle(tmp):
    return _attention_head(tmp, "eagle", lambda t: EF.eagle1_state(t, noise=0.01))


def eagle3(tmp):
    return _attention_head(tmp, "eagle3", lambda t: EF.eagle3_state(t, [0, 0, 1], noise=0.05))


def hybrid(tmp):
    return _attention_head(tmp, "hybrid_head", lambda t: EF.eagle3_state(t, [0, 0, 1], noise=0.05))


def dflash(tmp):
    target = DF.repeat_target(0)
    folder = DF.copy_dflash(os.path.join(tmp, "dflash"), target, block_size=GAMMA + 1)
    return target, build_drafter(DrafterSpec("dflash", folder), target_info(target, None)), [7, 9, 11]


def specdiff(tmp):
    target, tok, prompt = _tiny_text_target()
    folder = DF.dream_from_llama(os.path.join(tmp, "dream"), target)
    spec = DrafterSpec("specdiff", folder, {"unmask_order": "left_to_right"})
    return target, build_drafter(spec, target_info(target, tok)), prompt


FAMILIES = [ngram, suffix, draft, draft_other_tokenizer, eagle, eagle3, hybrid, dflash, specdiff]


CASES = [(f, False) for f in FAMILIES] + [(f, True) for f in (suffix, draft, eagle3, dflash)]


@pytest.mark.parametrize("family,with_budget", CASES,
                         ids=lambda c: c.__name__ if callable(c) else ("budget" if c else ""))
def test_first_tokens_follow_the_target(family, with_budget, tmp_path):
    """with_budget: the speculation budget picks each row's draft length (0 allowed) per step."""
    target, drafter, prompt = family(str(tmp_path))
    params = SamplingParams(temperature=pick_temperature(target, prompt))
    # room for a whole chain after the prefill token, so drafts reach every checked position
    requests = [Request(list(prompt), max_new_tokens=GAMMA + 2, seed=s) for s in range(DRAWS)]
    engine = EmbeddedEngine(target, None, drafter, GAMMA, params,
                            mixed_budget() if with_budget else None)
    outputs, stats = engine.generate(requests, batch_size=100)

    result = conditional_chi_square([o.output_token_ids for o in outputs], POSITIONS,
                                    target_law(target, prompt, params))
    print(family.__name__, f"T={params.temperature}", f"drafted {stats.num_draft_tokens}",
          f"accepted {stats.num_accepted_tokens}",
          {k: (round(v[0], 1), v[1], f"{v[2]:.1e}") for k, v in result.items()})
    assert stats.num_draft_tokens >= DRAWS / 2, "the drafter hardly drafted"
    if with_budget:  # the budget really chose: some rows drafted less than gamma
        assert stats.num_draft_tokens < GAMMA * len(stats.accept_lengths), stats.summary()
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens, stats.summary()
    for name, (stat, df, p_value) in result.items():
        assert df > 0 and p_value > ALPHA, f"{name}: chi2={stat:.1f} df={df} p={p_value:.2e}"


def test_an_engine_that_always_accepts_is_caught(monkeypatch, tmp_path, summary_line):
    """The same check at the same size rejects an engine whose verify keeps every draft."""
    from specplug.engine import embedded
    from specplug.types import VerifyResult

    def always_accept(target_logits, proposal, params, generators=None):
        batch, n = proposal.tokens.shape
        taken = proposal.tokens != -1
        num = taken.long().cumprod(1).sum(1)  # [batch] every proposed draft
        last = torch.multinomial(probs_from_logits(target_logits[torch.arange(batch), num], params),
                                 1)[:, 0]
        tokens = torch.cat([proposal.tokens, torch.full((batch, 1), -1)], 1)
        tokens[torch.arange(batch), num] = last
        nodes = torch.where(torch.arange(n) < num[:, None], torch.arange(n), -1)
        return VerifyResult(tokens, num, nodes)

    monkeypatch.setattr(embedded, "verify", always_accept)
    target, drafter, prompt = draft(str(tmp_path))
    params = SamplingParams(temperature=pick_temperature(target, prompt))
    requests = [Request(list(prompt), max_new_tokens=GAMMA + 2, seed=s) for s in range(DRAWS)]
    outputs, _ = EmbeddedEngine(target, None, drafter, GAMMA, params).generate(requests, 100)

    stat, df, p_value = conditional_chi_square([o.output_token_ids for o in outputs], POSITIONS,
                                               target_law(target, prompt, params))["all"]
    summary_line(f"engine with an always-accept verify (draft family): chi2={stat:.1f} df={df} "
                 f"p={p_value:.1e} -> {'rejected' if p_value < ALPHA else 'NOT rejected'}")
    assert p_value < ALPHA
