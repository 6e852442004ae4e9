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
from sglang.srt.speculative.eagle_utils import default_tree_mask_mode
from sglang.srt.speculative.eagle_worker_common import build_eagle_verify_input, run_eagle_verify
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
from sglang.srt.speculative.spec_utils import get_plan_stream
from sglang.srt.utils import is_cpu

from specplug.drafters.base import DrafterSpec, TargetInfo, build_drafter, family_of

from .algorithms import SAMPLING_REFUSED, drafter_options, drafter_path, resolve_method
from .batch import RowIds, chain_tokens, draft_input

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
        self.topk = 1
        self.speculative_num_steps = int(spec.speculative_num_steps)
        self.speculative_num_draft_tokens = int(spec.speculative_num_draft_tokens)
        self.plan_stream, self.plan_stream_ctx = get_plan_stream(self.device)
        self.adaptive_controller = None
        self.rows = RowIds()
        self.greedy_verify_only = is_cpu()  # see the module docstring

        draft_path = drafter_path(spec.speculative_draft_model_path)
        self.method = resolve_method(spec.speculative_algorithm, draft_path)
        options = {k: v for k, v in drafter_options().items() if k != "path"}
        self.drafter = build_drafter(
            DrafterSpec(self.method,
                        draft_path if family_of(self.method).needs_weights else None, options),
            _target_info(server_args, target_worker, self.device))
        if self.drafter.needs.hidden_layers:
            raise ValueError(f"specplug method {self.method!r} reads target hidden states, which "
                             "SGLang hands only to its own EAGLE/DFLASH workers")
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
        batch.spec_info = self._chain_verify_input(batch)
        result = run_eagle_verify(
            batch, pp_proxy_tensors=pp_proxy_tensors, target_worker=self.target_worker,
            req_to_token_pool=self.req_to_token_pool,
            token_to_kv_pool_allocator=self.token_to_kv_pool_allocator,
            plan_stream=self.plan_stream, plan_stream_ctx=self.plan_stream_ctx, topk=self.topk,
            num_draft_tokens=self.speculative_num_draft_tokens, device=self.device,
            metadata_ready_pre_pad=False, finalize_tree_path=True,
            grammar_barrier=grammar_barrier)
        if on_publish is not None:
            on_publish(result.new_seq_lens)
        result.next_draft_input = _root_input(result.next_draft_input.bonus_tokens)
        batch.forward_mode = ForwardMode.DECODE
        return result

    def note_request_finished(self, *, rid: str, natural_stop: bool) -> None:
        row = self.rows.pop(rid)
        if row is not None:
            self.drafter.release([row])

    def clear_cache_pool(self):
        self.drafter.release(self.rows.pop_all())

    # -- steps --------------------------------------------------------------------------------
    def _prefill(self, batch, on_publish, pp_proxy_tensors):
        result = self.target_worker.forward_batch_generation(
            batch, pp_proxy_tensors=pp_proxy_tensors, capture_hidden_mode=CaptureHiddenMode.NULL)
        # spec v2 convention: seq_lens stays the length before this step's new tokens
        result.new_seq_lens = batch.seq_lens
        if on_publish is not None:
            on_publish(result.new_seq_lens)
        result.next_draft_input = _root_input(result.next_token_ids.to(torch.int32))
        return result

    def _chain_verify_input(self, batch) -> EagleVerifyInput:
        root: EagleDraftInput = batch.spec_info
        bs = len(batch.reqs) if not batch.forward_mode.is_idle() else 0
        steps = self.speculative_num_steps
        if bs:
            inp = draft_input(batch.reqs, self.rows, steps, root.bonus_tokens)
            proposal = self.drafter.propose(inp)  # on self.device: the drafter lives there
            tokens = chain_tokens(proposal, root.bonus_tokens, steps)
        else:
            tokens = torch.empty((0, steps), dtype=torch.long, device=self.device)
        # EAGLE's topk = 1 topology: draft j (1-based) hangs under draft j - 1, draft 1 under root
        parents = torch.arange(-1, steps - 1 if steps > 1 else -1, dtype=torch.long,
                               device=self.device).repeat(bs, 1)
        selected = torch.arange(steps, dtype=torch.long, device=self.device).repeat(bs, 1)
        return build_eagle_verify_input(
            batch, root, parents, selected, tokens, None, target_worker=self.target_worker,
            topk=1, num_steps=steps, num_draft_tokens=self.speculative_num_draft_tokens,
            tree_mask_mode=default_tree_mask_mode(), device=self.device)


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


def _target_info(server_args, target_worker, device) -> TargetInfo:
    """What a token-only drafter borrows from SGLang's target: HF config, tokenizer, dtype, and
    the device its weights and tensors must live on."""
    from specplug.models.loading import load_tokenizer
    model_config = target_worker.model_runner.model_config
    tokenizer = load_tokenizer(server_args.tokenizer_path or server_args.model_path,
                               required=False)
    return TargetInfo(config=model_config.hf_text_config, tokenizer=tokenizer,
                      dtype=model_config.dtype, device=torch.device(device))
