"""specplug's token-only drafters as a vLLM `custom_class` proposer.

vLLM builds `SpecplugProposer(vllm_config)` in every worker and calls, once per step,
    propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings) -> list[list[int]]
with the batch in the runner's row order.  This adapter only translates: vLLM's row i becomes a
DraftInput row whose row id follows the request when vLLM moves it to another row (the request
ids of the runner's batch, found in load_model; where the runner is unknown, request_rows.py
recognises requests by their committed tokens), and the proposal's chain comes back as plain
token lists.

Which specplug drafter runs is read from `additional_config["specplug"]` of the LLM, because
speculative_config forbids unknown keys:
    LLM(model=target,
        speculative_config={"method": "custom_class", "num_speculative_tokens": 4,
                            "model": "specplug.integrations.vllm.proposer.SpecplugProposer"},
        additional_config={"specplug": {"method": "draft", "path": "/models/draft",
                                        "budget": True}})
With "budget", the speculation budget (specplug/budget.py, StepBudget) picks each request's
draft length every step, 0 allowed: vLLM schedules per-request lengths, so a shorter or empty
list is all it takes.

Drafters that read target hidden states (eagle, eagle3, hybrid, ...) are built in
`load_model(target_model)`, borrowing the target's embedding / lm_head, and get the features of
each step's committed positions from forward hooks on the target (target_features.py), keyed by
vLLM's request ids; they hand them over as DraftInput.hidden_states / hidden_start exactly as
the embedded engine does.
"""
from __future__ import annotations

import numpy as np
import torch

from specplug.budget import SpeculationBudget, StepBudget
from specplug.drafter_block import DrafterBlock, parse_block
from specplug.drafters.base import Drafter, build_drafter
from specplug.types import PAD, DraftInput, DraftProposal

from .request_rows import RequestRows
from .runner_access import target_info_from

CLASS_PATH = "specplug.integrations.vllm.proposer.SpecplugProposer"
CONFIG_KEY = "specplug"


def drafter_block_from(additional_config) -> DrafterBlock:
    """The block of LLM(additional_config={"specplug": {"method", "path", "options", "budget"}})."""
    block = additional_config.get(CONFIG_KEY) if isinstance(additional_config, dict) else None
    if not isinstance(block, dict):  # parse_block says what a present block lacks
        raise ValueError(
            f"custom_class {CLASS_PATH} needs additional_config={{'{CONFIG_KEY}': "
            "{'method': ..., 'path': ..., 'options': {...}}} naming the specplug drafter")
    return parse_block(block, f"additional_config['{CONFIG_KEY}']")


def proposal_to_lists(proposal: DraftProposal) -> list[list[int]]:
    """DraftProposal chain -> one token list per row, PAD dropped."""
    if proposal.tokens.shape[1] and not proposal.is_chain():
        raise ValueError("the drafter proposed a tree, but vLLM's custom_class verifies chains "
                         "only: configure the drafter for chains")
    return [[t for t in row if t != PAD] for row in proposal.tokens.tolist()]


class SpecplugProposer:
    """vLLM custom_class proposer wrapping one specplug Drafter."""

    def __init__(self, vllm_config, drafter: Drafter | None = None, check_vllm: bool = True):
        if check_vllm:
            from . import compat
            found = compat.problems()
            if found:
                raise RuntimeError("specplug cannot drive this vLLM: " + "; ".join(found))
            # vLLM's CPU rejection sampler is biased at T > 0 without this (cpu_sampling_fix.py)
            from .cpu_sampling_fix import install
            from .plugin import plugin_logger
            plugin_logger().info("%s", install())
        self.vllm_config = vllm_config
        spec_config = vllm_config.speculative_config
        self.num_draft_tokens = int(spec_config.num_speculative_tokens)
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        given = vllm_config.additional_config or {}
        block = drafter_block_from(given) if drafter is None or CONFIG_KEY in given else None
        # built in load_model when not given: hidden-state drafters borrow the target's modules
        self.spec = block.spec() if drafter is None else None
        self.steps = (StepBudget(SpeculationBudget(self.num_draft_tokens))
                      if block and block.budget else None)
        self.fed_len: dict[int, int] = {}  # specplug row id -> committed length at its last draft
        self.drafter = drafter
        self.requests = RequestRows()
        self.runner = None  # vLLM's model runner, once load_model found it
        self.features = None  # TargetFeatures, for drafters that read target hidden states
        self.row_of_request: dict[str, int] = {}  # vLLM request id -> specplug row id
        self.fed_upto: dict[str, int] = {}  # request id -> first position not yet handed over
        self._next_row = 0

    def load_model(self, target_model) -> None:
        from .plugin import plugin_logger
        from .runner_access import check_runner_settings, runner_calling_load_model
        if self.drafter is None:
            info = target_info_from(self.vllm_config.model_config, target_model)
            self.drafter = build_drafter(self.spec, info)
            plugin_logger().info("specplug %s drafter ready on %s", self.spec.method, info.device)
        # the runner's batch names each row's request: rows follow requests by id (without it,
        # request_rows.py recognises requests by their committed tokens)
        try:
            self.runner = runner_calling_load_model(target_model)
        except RuntimeError as e:
            if self.drafter.needs.hidden_layers:
                raise
            plugin_logger().info("%s; rows follow requests by their tokens instead", e)
            return
        if not self.drafter.needs.hidden_layers:
            return
        from .target_features import TargetFeatures
        check_runner_settings(self.vllm_config)
        self.features = TargetFeatures(target_model, self.runner, self.drafter.needs.hidden_layers)

    def _drafter(self) -> Drafter:
        if self.drafter is None:  # propose without load_model: a token-only drafter, config only
            self.drafter = build_drafter(self.spec, target_info_from(self.vllm_config.model_config))
        if self.drafter.needs.hidden_layers and self.features is None:
            raise RuntimeError("this specplug drafter reads target hidden states: vLLM must call "
                               "the proposer's load_model(target_model) first")
        return self.drafter

    @torch.inference_mode()
    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray,
                token_ids_cpu: np.ndarray, slot_mappings=None) -> list[list[int]]:
        """sampled_token_ids: per row, the tokens this step committed ([] = row not decoding);
        num_tokens_no_spec [max_rows] committed length; token_ids_cpu [max_rows, max_model_len]."""
        drafter = self._drafter()
        num_rows = len(sampled_token_ids)
        # a row drafts when it just sampled and has room left for at least one draft token
        active = [i for i, s in enumerate(sampled_token_ids)
                  if s and int(num_tokens_no_spec[i]) < self.max_model_len]
        contexts = [token_ids_cpu[i, :int(num_tokens_no_spec[i])] for i in active]
        if self.runner is None:
            row_ids = self.requests.assign(contexts, active)
            forgotten = self.requests.forgotten
        else:
            row_ids, forgotten = self._request_rows(active)
        if forgotten:  # requests that left the batch (or stopped drafting)
            drafter.release(forgotten)
            for r in forgotten:
                self.fed_len.pop(r, None)
            if self.steps:
                self.steps.forget(forgotten)
        drafts: list[list[int]] = [[] for _ in range(num_rows)]
        if not active:
            return drafts
        # the budget sees what each row committed this step: accepted drafts + the bonus token;
        # a drafter that scores its nodes drafts in full and is cut after drafting instead
        scored = self.steps is not None and drafter.scores_nodes
        committed = [len(sampled_token_ids[i]) for i in active]
        backlog = self._backlog(active, row_ids, contexts, committed) if self.steps else None
        limits = (self.steps.begin(row_ids, committed, scored=scored, backlog=backlog)
                  if self.steps else [self.num_draft_tokens] * len(active))
        # what was drafted goes through the budget's cut by its scores, unless this is a probe
        # (its one token is kept as it is)
        cut = scored and not self.steps.budget.probing
        chosen = [j for j, k in enumerate(limits) if k > 0]
        predicted, taken_in = 0.0, 0
        if chosen:
            inp = self._draft_input([active[j] for j in chosen], [row_ids[j] for j in chosen],
                                    [contexts[j] for j in chosen], max(limits[j] for j in chosen))
            if backlog:  # what the drafted rows took in first (the budget prices it apart)
                taken_in = sum(backlog[j][0] for j in chosen)
            proposal = drafter.propose(inp)
            chains = proposal_to_lists(proposal)
            if scored:  # scores of a chain fall along it, so the best k are its first k
                kept, predicted = self.steps.budget.cut_scored(
                    proposal.scores, proposal.tokens != PAD, cut,
                    caps=[limits[j] for j in chosen])
                chains = [c[:k] for c, k in zip(chains, kept)]
            for j, chain in zip(chosen, chains):
                i = active[j]
                room = self.max_model_len - int(num_tokens_no_spec[i])
                drafts[i] = chain[:min(limits[j], room)]
        if self.steps:
            self.steps.end(row_ids, [len(drafts[i]) for i in active], predicted, taken_in)
        return drafts

    def _backlog(self, active: list[int], row_ids: list[int], contexts: list[np.ndarray],
                 committed: list[int]) -> list[tuple[int, int]]:
        """Per row: the tokens its drafter would take in beyond this step's (its prompt before
        its first draft, the steps the budget skipped since), and the tokens it may still
        produce (its max_tokens less its output, where the runner says; else the room left)."""
        requests = getattr(self.runner, "requests", None) or {}
        req_ids = getattr(getattr(self.runner, "input_batch", None), "req_ids", None)
        out = []
        for i, r, ctx, n in zip(active, row_ids, contexts, committed):
            unseen = self._unseen(r, len(ctx))
            taken_in = unseen - n if r in self.fed_len else unseen
            left = self.max_model_len - len(ctx)
            state = requests.get(req_ids[i]) if req_ids is not None else None
            max_tokens = getattr(getattr(state, "sampling_params", None), "max_tokens", None)
            prompt = getattr(state, "num_prompt_tokens", None)
            if isinstance(max_tokens, int) and isinstance(prompt, int):
                left = min(left, max_tokens - (len(ctx) - prompt))
            out.append((max(0, taken_in), max(1, left)))
        return out

    def _unseen(self, row_id: int, committed_len: int) -> int:
        """Committed tokens the row's drafter has not been given (all of them before its first
        draft)."""
        return committed_len - self.fed_len.get(row_id, 0)

    def _draft_input(self, rows: list[int], row_ids: list[int], contexts: list[np.ndarray],
                     num_draft_tokens: int) -> DraftInput:
        """DraftInput for vLLM rows `rows` (specplug ids row_ids, committed tokens contexts)."""
        hidden = starts = None
        if self.features is not None:
            hidden, starts = self._features_for(rows, contexts)
        # tokens committed since the row's last draft: its accept lengths since then, summed
        # (a row the budget skipped drafts again with more than one step's worth)
        new = [self._unseen(r, len(c)) for r, c in zip(row_ids, contexts)]
        self.fed_len.update((r, len(c)) for r, c in zip(row_ids, contexts))
        return DraftInput(
            row_ids=row_ids,
            token_ids=[torch.from_numpy(c.astype(np.int64)) for c in contexts],
            num_draft_tokens=num_draft_tokens, hidden_states=hidden, hidden_start=starts,
            num_new_committed=new)

    def _request_rows(self, active: list[int]) -> tuple[list[int], list[int]]:
        """Row ids from vLLM's request ids, and the rows of requests vLLM no longer holds."""
        runner = self.runner
        req_ids = runner.input_batch.req_ids
        alive = runner.requests  # requests vLLM still holds, scheduled this step or not
        gone = [r for r in self.row_of_request if r not in alive]
        forgotten = [self.row_of_request.pop(r) for r in gone]
        for r in gone:
            self.fed_upto.pop(r, None)
        if self.features is not None:
            self.features.drop(gone)
        row_ids = []
        for i in active:
            req = req_ids[i]
            if req not in self.row_of_request:
                self.row_of_request[req] = self._next_row
                self._next_row += 1
            row_ids.append(self.row_of_request[req])
        return row_ids, forgotten

    def _features_for(self, rows: list[int], contexts: list[np.ndarray]):
        """Each row's features for committed positions [fed_upto, num_committed - 1) (the last
        committed token has none yet): (hidden, hidden_start)."""
        req_ids = self.runner.input_batch.req_ids
        hidden, starts = [], []
        for i, ctx in zip(rows, contexts):
            req = req_ids[i]
            start, stop = self.fed_upto.get(req, 0), len(ctx) - 1
            hidden.append(self.features.take(req, start, stop))
            starts.append(start)
            self.fed_upto[req] = max(start, stop)
        return hidden, starts
