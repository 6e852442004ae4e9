"""SpecplugWorker: SGLang's speculative worker for specplug drafters.

The scheduler builds `SpecplugWorker(server_args=, gpu_id=, nccl_port=, target_worker=)` and calls
`forward_batch_generation(batch)` once per step:
  prefill  the target runs the prompt (SGLang's own extend); the sampled token becomes each row's
           verify root (`EagleDraftInput.bonus_tokens`), as in SGLang's EAGLE/STANDALONE workers.
  decode   the specplug drafter proposes a chain per request from its committed tokens; SGLang's
           EAGLE chain verify (`build_eagle_verify_input` + `run_eagle_verify`, topk = 1) runs the
           target over [root, chain], accepts, commits the KV and returns `accept_lens` (accepted
           drafts + the bonus token), which SGLang turns into meta_info's spec_accept_length and
           spec_verify_ct.
There is no draft model runner and no draft KV cache in SGLang: the drafter keeps its own state
per request and reconciles it with the committed tokens on every call.

Drafters that read target hidden states (EAGLE heads, hybrid, DFlash) get them from SGLang's own
capture (target_features.py): the prefill runs with CaptureHiddenMode.FULL and the aux layers the
drafter reads; verify already runs FULL.  Each step's states of the committed positions are filed
per request and handed over as DraftInput.hidden_states / hidden_start, as every engine does.

Speculation budget ("budget": true in the drafter card): SGLang verifies one width for the whole
batch, so the worker asks specplug's budget (StepBudget over the padded cost model: rows x (1 +
width) verified tokens) for a width each step, from 0 (the step verifies only each row's root,
a plain decode step, and nobody drafts) up to the configured steps.  Chains only: a tree keeps
SGLang's configured shape.

Sampling: on CPU, SGLang's verify commits the target's argmax whatever a request's temperature
(`eagle_utils._verify_uses_greedy`), so a sampled request would silently come back greedy.
The worker refuses such requests instead: each ends at its prefill with SGLang's own abort
(`FINISH_ABORT`, HTTP 400) carrying SAMPLING_REFUSED.  Greedy requests are unaffected.
"""
from __future__ import annotations

import logging

import torch
from http import HTTPStatus

from sglang.srt.managers.schedule_batch import FINISH_ABORT
from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardMode
from sglang.srt.runtime_context import get_device, get_schedule, get_spec
from sglang.srt.speculative.base_spec_worker import BaseSpecWorker
from sglang.srt.speculative.eagle_info import EagleDraftInput, EagleVerifyInput
from sglang.kernels.ops.speculative.spec_tree import TreeMaskMode
from sglang.srt.speculative.eagle_utils import default_tree_mask_mode
from sglang.srt.speculative.eagle_worker_common import build_eagle_verify_input, run_eagle_verify
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
from sglang.srt.speculative.spec_utils import get_plan_stream
from sglang.srt.utils import is_cpu

from specplug.budget import SpeculationBudget, StepBudget
from specplug.drafters.base import DrafterSpec, TargetInfo, build_drafter, family_of
from specplug.types import PAD, DraftProposal

from .algorithms import SAMPLING_REFUSED, resolve_method, tree_options
from .drafter_card import read_card
from .batch import RowIds, chain_tokens, draft_input, tree_verify_tensors
from .target_features import FeatureTap

log = logging.getLogger("specplug.sglang")


class SpecplugWorker(BaseSpecWorker):
    def __init__(self, server_args, gpu_id: int, nccl_port: int, target_worker):
        super().__init__()
        spec = get_spec()
        self.server_args = server_args
        self.gpu_id = gpu_id
        self.device = get_device().device
        self.page_size = get_schedule().page_size
        self._target_worker = target_worker
        self._draft_worker = None  # the drafter lives in specplug, not in an SGLang runner
        self.speculative_algorithm = SpeculativeAlgorithm.from_string(spec.speculative_algorithm)
        self.topk = max(1, int(spec.speculative_eagle_topk or 1))  # > 1: trees (algorithms.py)
        self.speculative_num_steps = int(spec.speculative_num_steps)
        self.speculative_num_draft_tokens = int(spec.speculative_num_draft_tokens)
        self.plan_stream, self.plan_stream_ctx = get_plan_stream(self.device)
        self.adaptive_controller = None
        self.rows = RowIds()
        self.greedy_verify_only = is_cpu()  # see the module docstring

        card = read_card(spec.speculative_draft_model_path)  # folder and options (drafter_card.py)
        self.method = resolve_method(spec.speculative_algorithm, card)
        options = card.options
        self.steps = self._budget(card.budget)
        self._committed: dict[str, int] = {}  # rid -> tokens committed at the last step
        if self.topk > 1:
            options = {**tree_options(self.method, self.topk, self.speculative_num_steps,
                                      self.speculative_num_draft_tokens - 1), **options}
        family = family_of(self.method)
        info = _target_info(server_args, target_worker, self.device,
                            lend_modules=family.reads_hidden_states)
        self.drafter = build_drafter(
            DrafterSpec(self.method, card.path if family.needs_weights else None, options), info)
        # hidden-state drafters: the target captures the layers they read (target_features.py)
        self.features = None
        if self.drafter.needs.hidden_layers:
            runner = target_worker.model_runner
            self.features = FeatureTap(runner.model, info.num_layers,
                                       self.drafter.needs.hidden_layers, device=self.device)
            self.features.install(runner)
        log.info("specplug %s drafter ready on %s: %s, %d draft tokens per step", self.method,
                 self.device, type(self.drafter).__name__, self.speculative_num_steps)

    # -- what the scheduler calls -------------------------------------------------------------
    def forward_batch_generation(self, batch, on_publish=None, grammar_barrier=None,
                                 pp_proxy_tensors=None):
        if batch.forward_mode.is_extend() or batch.is_extend_in_batch:
            if self.greedy_verify_only:
                refuse_sampled(batch.reqs)
            return self._prefill(batch, on_publish, pp_proxy_tensors)
        if batch.spec_info is None:
            batch.spec_info = _root_input(torch.empty(0, dtype=torch.int32, device=self.device))
        bs = 0 if batch.forward_mode.is_idle() else len(batch.reqs)
        # host copy, taken once: tree positions/masks and where each row's verified features start
        seq_lens = (_host_list(batch, "seq_lens")
                    if bs and (self.features is not None or self.topk > 1) else None)
        batch.spec_info, width = self._verify_input(batch, seq_lens)
        result = run_eagle_verify(
            batch, pp_proxy_tensors=pp_proxy_tensors, target_worker=self.target_worker,
            req_to_token_pool=self.req_to_token_pool,
            token_to_kv_pool_allocator=self.token_to_kv_pool_allocator,
            plan_stream=self.plan_stream, plan_stream_ctx=self.plan_stream_ctx, topk=self.topk,
            num_draft_tokens=width, device=self.device,
            metadata_ready_pre_pad=False, finalize_tree_path=True,
            grammar_barrier=grammar_barrier)
        if self.features is not None and bs:
            self._file_verified(batch.reqs, seq_lens, result, width)
        if on_publish is not None:
            on_publish(result.new_seq_lens)
        result.next_draft_input = _root_input(result.next_draft_input.bonus_tokens)
        batch.forward_mode = ForwardMode.DECODE
        return result

    def note_request_finished(self, *, rid: str, natural_stop: bool) -> None:
        row = self.rows.pop(rid)
        self._committed.pop(rid, None)
        if row is not None:
            self.drafter.release([row])
            if self.steps is not None:
                self.steps.forget([row])
        if self.features is not None:
            self.features.drop(rid)

    def clear_cache_pool(self):
        rows = self.rows.pop_all()
        self.drafter.release(rows)
        self._committed.clear()
        if self.steps is not None:
            self.steps.forget(rows)
        if self.features is not None:
            self.features.clear()

    # -- steps --------------------------------------------------------------------------------
    def _prefill(self, batch, on_publish, pp_proxy_tensors):
        capture = CaptureHiddenMode.NULL if self.features is None else CaptureHiddenMode.FULL
        result = self.target_worker.forward_batch_generation(
            batch, pp_proxy_tensors=pp_proxy_tensors, capture_hidden_mode=capture)
        if self.features is not None and not batch.forward_mode.is_idle():
            self._file_prefilled(batch, result.logits_output.hidden_states)
        # spec v2 convention: seq_lens stays the length before this step's new tokens
        result.new_seq_lens = batch.seq_lens
        if on_publish is not None:
            on_publish(result.new_seq_lens)
        result.next_draft_input = _root_input(result.next_token_ids.to(torch.int32))
        return result

    def _file_prefilled(self, batch, hidden: torch.Tensor) -> None:
        """hidden [sum(extend_lens), F]: every extend token's captured states, request by request."""
        if hidden is None or hidden.shape[0] != sum(batch.extend_lens):
            raise RuntimeError("SGLang's prefill returned no hidden state per extend token "
                               f"({None if hidden is None else tuple(hidden.shape)} for "
                               f"{sum(batch.extend_lens)} tokens)")
        offset = 0
        for req, start, n in zip(batch.reqs, batch.prefix_lens, batch.extend_lens):
            self.features.file(req.rid, start, self.features.select(hidden[offset:offset + n]))
            offset += n

    def _file_verified(self, reqs, seq_lens: list[int], result, width: int) -> None:
        """Each row's verified prefix [old root, accepted drafts] out of its block of
        logits_output.hidden_states [bs * width, F] (width: the step's verified tokens per row;
        the accepted path is at the front of a row's block, compacted there by SGLang for
        trees)."""
        hidden = result.logits_output.hidden_states
        accept = result.accept_lens.tolist()  # host: the slice bounds of each row's features
        for r, req in enumerate(reqs):
            block = hidden[r * width:r * width + accept[r]]
            self.features.file(req.rid, seq_lens[r], self.features.select(block))

    def _verify_input(self, batch, seq_lens: list[int] | None) -> tuple[EagleVerifyInput, int]:
        """This step's verify input, and the tokens it verifies per row."""
        root: EagleDraftInput = batch.spec_info
        bs = len(batch.reqs) if not batch.forward_mode.is_idle() else 0
        steps, width = self.speculative_num_steps, self.speculative_num_draft_tokens
        if not bs and self.topk > 1:
            return EagleVerifyInput.create_idle_input(self.topk, steps, width, self.device), width
        if self.steps is not None and bs:
            proposal, steps = self._budgeted_proposal(batch, root.bonus_tokens)
            if steps == 0:
                return self._root_only_verify_input(batch, root), 1
        else:
            proposal = self._propose(batch, root.bonus_tokens) if bs else None
        if self.topk > 1:
            return self._tree_verify_input(proposal, root.bonus_tokens, seq_lens), width
        if bs:
            tokens = chain_tokens(proposal, root.bonus_tokens, steps)
        else:
            tokens = torch.empty((0, steps), dtype=torch.long, device=self.device)
        # EAGLE's topk = 1 topology: draft j (1-based) hangs under draft j - 1, draft 1 under root
        parents = torch.arange(-1, steps - 1 if steps > 1 else -1, dtype=torch.long,
                               device=self.device).repeat(bs, 1)
        selected = torch.arange(steps, dtype=torch.long, device=self.device).repeat(bs, 1)
        return build_eagle_verify_input(
            batch, root, parents, selected, tokens, None, target_worker=self.target_worker,
            topk=1, num_steps=steps, num_draft_tokens=steps + 1,
            tree_mask_mode=default_tree_mask_mode(), device=self.device), steps + 1

    # -- the speculation budget ---------------------------------------------------------------
    def _budget(self, wanted: bool) -> StepBudget | None:
        if not wanted:
            return None
        if self.topk > 1:
            log.info("specplug budget off: a tree (topk %d) verifies SGLang's configured shape",
                     self.topk)
            return None
        # one width for the whole batch, padded: the embedded engine's cost model
        return StepBudget(SpeculationBudget(self.speculative_num_steps, verify_pads_rows=True))

    def _budgeted_proposal(self, batch, roots: torch.Tensor) -> tuple[DraftProposal | None, int]:
        """roots [bs].  The budget's width for this step (0: nobody drafts) and the proposal cut
        to it.  SGLang pads every row to the width, so the budget counts that padding."""
        reqs = batch.reqs
        row_ids = [self.rows.of(r.rid) for r in reqs]
        lengths = [len(r.origin_input_ids) + len(r.output_ids) for r in reqs]
        # a row new to the worker committed its prefill token; the budget does not time that step
        committed = [n - self._committed.get(r.rid, n - 1) for r, n in zip(reqs, lengths)]
        self._committed = {r.rid: n for r, n in zip(reqs, lengths)}
        scored = self.drafter.scores_nodes
        # more to feed than this step committed: a prompt, or steps without drafts (the
        # drafter's catch-up, priced apart from its draft tokens)
        behind = [max(0, self.rows.unseen(r.rid, n) - c)
                  for r, n, c in zip(reqs, lengths, committed)]
        backlog = [(b, max(1, _max_new_tokens(r) - len(r.output_ids)))
                   for b, r in zip(behind, reqs)]
        limits = self.steps.begin(row_ids, committed, scored=scored, backlog=backlog)
        width, proposal, predicted, taken_in = max(limits), None, 0.0, 0
        if width:
            taken_in = sum(behind)  # one width for the whole batch: every row drafts
            proposal = self._propose(batch, roots, width)
            if scored and proposal.scores is not None and not self.steps.budget.probing:
                # the budget keeps each row's best nodes of what was drafted (a chain's first k)
                kept, predicted = self.steps.budget.cut_scored(proposal.scores,
                                                               proposal.tokens != PAD)
                width = max(kept)
        self.steps.end(row_ids, [width] * len(reqs), predicted, taken_in)
        return proposal, width

    def _root_only_verify_input(self, batch, root: EagleDraftInput) -> EagleVerifyInput:
        """A verify of each row's root alone (no drafts): SGLang's chain verify at width 1 is a
        plain decode step, and the scheduler takes its result as any other step's."""
        bs = len(batch.reqs)
        dev = self.device
        no_next = torch.full((bs, 1), -1, dtype=torch.long, device=dev)
        # one node per row sees all of its context and itself: an all-True mask in either layout
        verify_mask = self.target_worker.model_runner.attn_backend.verify_mask
        if verify_mask is not None and verify_mask.fits(bs):
            mask = verify_mask.buffer
            mask.fill_(True)
        else:
            mask = torch.ones(sum(_host_list(batch, "seq_lens")) + bs, dtype=torch.bool,
                              device=dev)
        return EagleVerifyInput(
            draft_token=root.bonus_tokens, custom_mask=mask,
            positions=batch.seq_lens.to(torch.int64),
            retrieve_index=torch.arange(bs, dtype=torch.long, device=dev)[:, None],
            retrieve_next_token=no_next, retrieve_next_sibling=no_next.clone(),
            retrieve_cum_len=None, spec_steps=0, topk=1, draft_token_num=1,
            capture_hidden_mode=CaptureHiddenMode.FULL, seq_lens_sum=None, seq_lens_cpu=None)

    def _propose(self, batch, roots: torch.Tensor, steps: int | None = None) -> DraftProposal:
        """roots [bs]: each row's verify root; steps: draft tokens per row (default: the
        configured steps).  The drafter's proposal, on self.device."""
        inp = draft_input(batch.reqs, self.rows, steps or self.speculative_num_steps, roots)
        if self.features is not None:
            # committed positions [start, n - 1) the drafter has not seen
            taken = [self.features.take(r.rid, len(t) - 1) for r, t in zip(batch.reqs, inp.token_ids)]
            inp.hidden_start = [start for start, _ in taken]
            inp.hidden_states = [feats for _, feats in taken]
        return self.drafter.propose(inp)

    def _tree_verify_input(self, proposal: DraftProposal, roots: torch.Tensor,
                           seq_lens: list[int]) -> EagleVerifyInput:
        """topk > 1: the proposal (a tree, or a chain) as SGLang's fixed-width verify tree, in the
        mask layout its attention backend reads (batch.tree_verify_tensors)."""
        verify_mask = self.target_worker.model_runner.attn_backend.verify_mask
        mode = default_tree_mask_mode() if verify_mask is None else verify_mask.mode
        if mode not in (TreeMaskMode.QLEN_ONLY, TreeMaskMode.FULL_MASK):
            raise RuntimeError(f"specplug trees need a QLEN_ONLY or FULL_MASK tree mask; this "
                               f"attention backend reads {mode}")
        t = tree_verify_tensors(proposal, roots, seq_lens,
                                self.speculative_num_draft_tokens, self.speculative_num_steps,
                                full_mask=mode == TreeMaskMode.FULL_MASK)
        return EagleVerifyInput(
            draft_token=t.draft_tokens, custom_mask=t.tree_mask, positions=t.positions,
            retrieve_index=t.retrieve_index, retrieve_next_token=t.retrieve_next_token,
            retrieve_next_sibling=t.retrieve_next_sibling, retrieve_cum_len=None,
            spec_steps=self.speculative_num_steps, topk=self.topk,
            draft_token_num=self.speculative_num_draft_tokens, capture_hidden_mode=None,
            seq_lens_sum=None, seq_lens_cpu=None, draft_probs=None,
            prepared_out_cache_loc=None, prepared_mrope_positions=None)


def refuse_sampled(reqs) -> None:
    """End every request that samples (SGLang marks greedy as top_k == 1) after this step, with
    SGLang's abort and SAMPLING_REFUSED as the message its client gets."""
    for req in reqs:
        if req.sampling_params.top_k != 1 and req.to_finish is None and not req.finished():
            req.to_finish = FINISH_ABORT(SAMPLING_REFUSED, HTTPStatus.BAD_REQUEST, "BadRequestError")


def _root_input(bonus_tokens: torch.Tensor) -> EagleDraftInput:
    """The per-row state the scheduler carries between steps: only the verify root matters
    (topk_p/topk_index are there because SGLang filters and merges them with the batch)."""
    bs = bonus_tokens.shape[0]
    return EagleDraftInput(
        bonus_tokens=bonus_tokens,
        topk_p=torch.ones((bs, 1), dtype=torch.float32, device=bonus_tokens.device),
        topk_index=bonus_tokens.view(bs, 1).to(torch.int64),
        hidden_states=None, capture_hidden_mode=CaptureHiddenMode.NULL)


def _max_new_tokens(req) -> int:
    """The request's max_new_tokens (unset: as many as its context allows, taken as many)."""
    n = getattr(getattr(req, "sampling_params", None), "max_new_tokens", None)
    return n if isinstance(n, int) else 1 << 20


def _host_list(batch, name: str) -> list[int]:
    """batch.<name> on the host (SGLang keeps a CPU copy of seq_lens beside the device one)."""
    cpu = getattr(batch, f"{name}_cpu", None)
    return (cpu if cpu is not None else getattr(batch, name)).tolist()


def _target_info(server_args, target_worker, device, lend_modules: bool) -> TargetInfo:
    """What a drafter borrows from SGLang's target: HF config, tokenizer, dtype, the device its
    weights and tensors must live on, and for heads the target's embedding and lm_head."""
    from specplug.models.lent import lend_modules as lend
    from specplug.models.loading import load_tokenizer
    model_config = target_worker.model_runner.model_config
    tokenizer = load_tokenizer(server_args.tokenizer_path or server_args.model_path,
                               required=False)
    info = TargetInfo(config=model_config.hf_text_config, tokenizer=tokenizer,
                      dtype=model_config.dtype, device=torch.device(device))
    if not lend_modules:
        return info
    model = target_worker.model_runner.model
    inner = getattr(model, "model", model)
    return lend(info, getattr(inner, "embed_tokens", None), getattr(model, "lm_head", None),
                info.vocab_size)
