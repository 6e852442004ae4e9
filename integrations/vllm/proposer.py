"""specplug's token-only drafters as a vLLM `custom_class` proposer.

vLLM builds `SpecplugProposer(vllm_config)` in every worker and calls, once per step,
    propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings) -> list[list[int]]
with the batch in the runner's row order.  This adapter only translates: vLLM's row i becomes a
DraftInput row whose row id follows the request when vLLM moves it to another row
(request_rows.py: vLLM passes no request ids, so requests are recognised by their committed
tokens), and the proposal's chain comes back as plain token lists.

Which specplug drafter runs is read from `additional_config["specplug"]` of the LLM, because
speculative_config forbids unknown keys:
    LLM(model=target,
        speculative_config={"method": "custom_class", "num_speculative_tokens": 4,
                            "model": "specplug.integrations.vllm.proposer.SpecplugProposer"},
        additional_config={"specplug": {"method": "draft", "path": "/models/draft"}})
"""
from __future__ import annotations

import numpy as np
import torch

from specplug.drafters.base import Drafter, DrafterSpec, TargetInfo, build_drafter
from specplug.types import PAD, DraftInput, DraftProposal

from .request_rows import RequestRows

CLASS_PATH = "specplug.integrations.vllm.proposer.SpecplugProposer"
CONFIG_KEY = "specplug"


def drafter_spec_from(additional_config) -> DrafterSpec:
    """Read {"method", "path", "options"} from LLM(additional_config={"specplug": {...}})."""
    block = additional_config.get(CONFIG_KEY) if isinstance(additional_config, dict) else None
    if not isinstance(block, dict) or not block.get("method"):
        raise ValueError(
            f"custom_class {CLASS_PATH} needs additional_config={{'{CONFIG_KEY}': "
            "{'method': ..., 'path': ..., 'options': {...}}} naming the specplug drafter")
    unknown = set(block) - {"method", "path", "options"}
    if unknown:
        raise ValueError(f"additional_config['{CONFIG_KEY}'] has unknown keys {sorted(unknown)}; "
                         "known: method, path, options")
    return DrafterSpec(str(block["method"]), block.get("path"), dict(block.get("options") or {}))


def target_info_from(model_config) -> TargetInfo:
    """What a token-only drafter may borrow from vLLM's target: its HF config and tokenizer."""
    from specplug.models.loading import load_tokenizer
    tokenizer = load_tokenizer(model_config.tokenizer, required=False)
    return TargetInfo(config=model_config.hf_text_config, tokenizer=tokenizer,
                      dtype=model_config.dtype)


def proposal_to_lists(proposal: DraftProposal) -> list[list[int]]:
    """DraftProposal chain -> one token list per row, PAD dropped."""
    if proposal.tokens.shape[1] and not proposal.is_chain():
        raise ValueError("the drafter proposed a tree, but vLLM's custom_class verifies chains "
                         "only: configure the drafter for chains")
    return [[t for t in row if t != PAD] for row in proposal.tokens.tolist()]


class SpecplugProposer:
    """vLLM custom_class proposer wrapping one specplug Drafter (token-only families)."""

    def __init__(self, vllm_config, drafter: Drafter | None = None, check_vllm: bool = True):
        if check_vllm:
            from . import compat
            found = compat.problems()
            if found:
                raise RuntimeError("specplug cannot drive this vLLM: " + "; ".join(found))
        spec_config = vllm_config.speculative_config
        self.num_draft_tokens = int(spec_config.num_speculative_tokens)
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        if drafter is None:
            spec = drafter_spec_from(vllm_config.additional_config)
            drafter = build_drafter(spec, target_info_from(vllm_config.model_config))
            if drafter.needs.hidden_layers:
                raise ValueError(
                    f"specplug method {spec.method!r} needs target hidden states, which vLLM does "
                    "not give a custom_class proposer: use its speculative_config from "
                    "integrations/vllm/README.md instead")
        self.drafter = drafter
        self.requests = RequestRows()

    def load_model(self, target_model) -> None:
        # token-only drafters load their own weights in build_drafter; nothing to borrow here
        return None

    @torch.inference_mode()
    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray,
                token_ids_cpu: np.ndarray, slot_mappings=None) -> list[list[int]]:
        """sampled_token_ids: per row, the tokens this step committed ([] = row not decoding);
        num_tokens_no_spec [max_rows] committed length; token_ids_cpu [max_rows, max_model_len]."""
        num_rows = len(sampled_token_ids)
        # a row drafts when it just sampled and has room left for at least one draft token
        active = [i for i, s in enumerate(sampled_token_ids)
                  if s and int(num_tokens_no_spec[i]) < self.max_model_len]
        contexts = [token_ids_cpu[i, :int(num_tokens_no_spec[i])] for i in active]
        row_ids = self.requests.assign(contexts, active)
        if self.requests.forgotten:  # requests that left the batch (or stopped drafting)
            self.drafter.release(self.requests.forgotten)
        drafts: list[list[int]] = [[] for _ in range(num_rows)]
        if not active:
            return drafts
        inp = DraftInput(
            row_ids=row_ids,
            token_ids=[torch.from_numpy(c.astype(np.int64)) for c in contexts],
            num_draft_tokens=self.num_draft_tokens)
        for i, chain in zip(active, proposal_to_lists(self.drafter.propose(inp))):
            room = self.max_model_len - int(num_tokens_no_spec[i])
            drafts[i] = chain[:min(self.num_draft_tokens, room)]
        return drafts
