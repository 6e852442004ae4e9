"""The speculative algorithm names specplug adds to SGLang, and how each resolves server args.

    python -m sglang.launch_server --model-path T --speculative-algorithm SPECPLUG_DRAFT \
        --speculative-draft-model-path D [--speculative-num-draft-tokens K]

Names (the user's vocabulary, not SGLang's):
  SPECPLUG           the drafter family a card names, else the one detected from the draft
                     folder's config (a draft model, a SpecDiff drafter, ...); no folder: n-gram
  SPECPLUG_DRAFT     a draft causal LM, with the target's tokenizer or another one
  SPECPLUG_SPECDIFF  a SpecDiff/Dream diffusion drafter (a whole block per step)
  SPECPLUG_NGRAM     prompt lookup over each request's own tokens (no folder)
  SPECPLUG_SUFFIX    suffix decoding over each request's tokens and earlier outputs (no folder)
  SPECPLUG_EAGLE     specplug's EAGLE-1/2 head runtime over an EAGLE checkpoint
  SPECPLUG_EAGLE3    specplug's EAGLE-3 head runtime over an EAGLE-3 checkpoint
  SPECPLUG_DFLASH    specplug's DFlash block drafter over a DFlash checkpoint
  SPECPLUG_HYBRID    lookup and a trained head combined per row (the folder is the head's)
--speculative-draft-model-path names the drafter's folder, or a drafter card: a folder whose
specplug.json carries the drafter's options and folder (drafter_card.py).  SGLang has no server
argument for them, and specplug passes none through the environment.
The last four read target hidden states: the worker has the target capture the layers they need
(target_features.py), and turns the radix cache off (a cached prefix is never run, so it has no
hidden states).  EAGLE-1/2, EAGLE-3 and DFlash checkpoints also run on SGLang's own EAGLE /
EAGLE3 / DFLASH workers (`specplug convert --to sglang` writes the layouts they load).

By default every specplug algorithm drafts one chain per request, verified by SGLang's own EAGLE
chain verify: topk is 1 and num_draft_tokens = num_steps + 1 (the root plus the chain).  With
--speculative-eagle-topk K > 1 drafters that can propose trees do (EAGLE-2 trees of depth
num_steps for the heads, hybrid's merged tree, suffix's best tree), of num_draft_tokens - 1 nodes
(default K * num_steps), verified by SGLang's EAGLE tree verify.  Drafts are computed from each
request's committed tokens on the host, so the scheduler runs without overlap.
"""
from __future__ import annotations

import logging
import os

from specplug.drafter_block import DrafterBlock
from specplug.drafters.base import families, family_of

from .drafter_card import read_card

# SGLang algorithm name -> specplug drafter method (None: detected from the draft folder); each
# family that specplug's worker serves names its algorithm (Family.sglang_plugin_name)
ALGORITHMS: dict[str, str | None] = {"SPECPLUG": None, **{
    f.sglang_plugin_name: f.method for f in families() if f.sglang_plugin_name}}

# On CPU SGLang's verify commits the target's argmax whatever the temperature, so the worker
# ends sampled requests with this message (worker.refuse_sampled) instead of answering greedily.
SAMPLING_REFUSED = ("specplug on SGLang CPU refuses temperature > 0: SGLang's CPU verify commits "
                    "the target's argmax, so sampled output would not follow the target's "
                    "distribution; use temperature 0 here, or a GPU")

# specplug methods SGLang serves with its own workers (from converted checkpoints)
SGLANG_BUILTINS = {f.method: f.sglang_algorithm for f in families() if f.sglang_algorithm}
DEFAULT_NUM_STEPS = 4  # draft tokens per verify when neither steps nor draft tokens are given

log = logging.getLogger("specplug.sglang")


def algorithm_for(method: str, native: bool = True) -> str:
    """The --speculative-algorithm value that runs specplug `method` in SGLang: SGLang's own
    worker where it has one for the method's checkpoints (native), else specplug's."""
    if native and method in SGLANG_BUILTINS:
        return SGLANG_BUILTINS[method]
    for name, m in ALGORITHMS.items():
        if m == method:
            return name
    raise ValueError(f"specplug method {method!r} has no SGLang algorithm; known: "
                     f"{', '.join(sorted(set(SGLANG_BUILTINS) | {m for m in ALGORITHMS.values() if m}))}")


def resolve_method(algorithm: str, card: DrafterBlock) -> str:
    """The specplug drafter method an algorithm name runs over the drafter card SGLang was given
    (drafter_card.read_card), with a one-line error if it cannot."""
    name = algorithm.upper()
    if name not in ALGORITHMS:
        raise ValueError(f"{algorithm!r} is not a specplug algorithm; known: {', '.join(ALGORITHMS)}")
    method = ALGORITHMS[name]
    if method is None:
        method = card.method
        if method is None and not card.path:
            return "ngram"
        if method is None:
            from specplug.drafters.detect import detect_method
            method = detect_method(card.path)
    elif card.method not in (None, method):
        raise ValueError(f"the drafter card names method {card.method!r}, but "
                         f"--speculative-algorithm {name} runs {method!r}")
    family = family_of(method)
    if not family.sglang_plugin_name:
        raise ValueError(f"{card.path}: specplug method {method!r} is not served through SGLang")
    if family.needs_weights and not card.path:
        raise ValueError(f"--speculative-algorithm {name} needs --speculative-draft-model-path "
                         f"(a {method} drafter folder)")
    return method


def handle_server_args(args) -> None:
    """Resolve the chain shape and scheduling a specplug algorithm needs; reject what it cannot do.

    SGLang hands a recording stand-in: reads see the resolved args, writes become declarations.
    """
    name = str(args.speculative_algorithm).upper()
    path = args.speculative_draft_model_path
    if path and not os.path.exists(path):
        raise ValueError(f"drafter folder {path} does not exist")
    card = read_card(path)
    if card.path and not os.path.exists(card.path):
        raise ValueError(f"{path}: the drafter card's folder {card.path} does not exist")
    method = resolve_method(name, card)
    topk = args.speculative_eagle_topk or 1
    if topk < 1:
        raise ValueError(f"{name}: --speculative-eagle-topk must be >= 1, got {topk}")
    steps, tokens = args.speculative_num_steps, args.speculative_num_draft_tokens
    if steps is None:
        steps = tokens - 1 if tokens and topk == 1 else DEFAULT_NUM_STEPS
    if steps < 1:
        raise ValueError(f"{name} needs at least one draft token per step, got "
                         f"--speculative-num-steps {steps}")
    if topk == 1:  # a chain: the root plus num_steps drafts
        if tokens is not None and tokens != steps + 1:
            log.warning("%s: --speculative-num-draft-tokens set to num_steps + 1 = %d (a chain)",
                        name, steps + 1)
        tokens = steps + 1
    elif tokens is None:  # a tree of depth num_steps, topk nodes expanded per depth
        tokens = topk * steps + 1
    elif tokens < 2:
        raise ValueError(f"{name}: a tree needs --speculative-num-draft-tokens >= 2 (the root "
                         f"and one node), got {tokens}")
    args.speculative_num_steps = steps
    args.speculative_eagle_topk = topk
    args.speculative_num_draft_tokens = tokens
    if not args.disable_overlap_schedule:
        # the drafter reads each request's committed tokens, which overlap scheduling delays
        args.disable_overlap_schedule = True
        log.info("%s: overlap scheduling disabled (drafts come from committed tokens)", name)
    if args.enable_mixed_chunk:
        args.enable_mixed_chunk = False
    if not getattr(args, "disable_cuda_graph", True) and not args.enable_return_hidden_states:
        # SGLang verifies every non-standalone algorithm with CaptureHiddenMode.FULL, and a CUDA
        # graph replays only the capture mode it was captured with
        args.enable_return_hidden_states = True
    if family_of(method).reads_hidden_states and not getattr(args, "disable_radix_cache", False):
        # a prefix served from the radix cache is never run through the target: no features
        args.disable_radix_cache = True
        log.info("%s: radix cache disabled (the drafter reads every position's hidden states)",
                 name)


def tree_options(method: str, topk: int, depth: int, nodes: int) -> dict:
    """Drafter options that make `method` propose the tree SGLang was told to verify
    (--speculative-eagle-topk / -num-steps / -num-draft-tokens); options the user set win."""
    eagle = {"tree_topk": topk, "tree_depth": depth, "tree_nodes": nodes}
    if method in ("eagle", "eagle3"):
        return eagle
    if method == "hybrid":  # the head's tree, merged with the lookup's chain
        return {"mode": "tree", **{f"head_{k}": v for k, v in eagle.items()}}
    if method == "suffix":
        return {"tree_nodes": nodes}
    return {}  # chains are trees too: verified as one


def tree_shape(method: str, options: dict, num_draft_tokens: int) -> tuple[int, int, int]:
    """(topk, num_steps, num_draft_tokens) of SGLang's verify for drafter options: a chain of
    num_draft_tokens unless the options ask for a tree (the inverse of tree_options)."""
    prefix = "head_" if method == "hybrid" else ""
    topk = int(options.get(f"{prefix}tree_topk") or 0)
    if method == "suffix" and int(options.get("tree_nodes") or 0) > 0:
        topk = max(topk, 2)  # a suffix tree has no fixed fan-out: any topk > 1 verifies trees
    if topk <= 1:
        return 1, num_draft_tokens, num_draft_tokens + 1
    depth = int(options.get(f"{prefix}tree_depth") or num_draft_tokens)
    nodes = int(options.get(f"{prefix}tree_nodes") or topk * depth)
    return topk, depth, nodes + 1


def spec_class():
    """A CustomSpecAlgo that answers every question SGLang asks of an algorithm."""
    from sglang.srt.speculative.spec_registry import CustomSpecAlgo

    class SpecplugAlgo(CustomSpecAlgo):
        # Not an EAGLE/STANDALONE family member: no draft model runner, no draft KV cache;
        # the worker reuses EAGLE's chain verify directly.
        def handle_server_args(self, server_args) -> None:
            handle_server_args(server_args)

        def has_draft_kv(self) -> bool:
            return False

        def carries_draft_hidden_states(self) -> bool:
            return False

        def create_future_map(self, device, req_to_token_pool, needs_cpu_seq_lens: bool = True,
                              needs_confidence_relay: bool = False):
            from sglang.srt.managers.overlap_utils import FutureMap
            return FutureMap(device, self, req_to_token_pool, needs_cpu_seq_lens,
                             needs_confidence_relay)

    return SpecplugAlgo
