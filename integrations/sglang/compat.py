"""Which SGLang the plugin trusts, and the few interfaces it relies on.

`problems()` returns one line per mismatch (empty list: supported).  The plugin registers nothing
when it is not empty, so an unknown SGLang keeps serving without specplug instead of calling an
interface whose meaning may have changed.
"""
from __future__ import annotations

import inspect

# SGLang releases whose speculative registry, EAGLE chain verify and batch result were read and
# tested with this adapter.
SUPPORTED_VERSIONS = ("0.5.23",)

# name -> parameters the adapter passes by keyword (a subset the callee must still accept)
REQUIRED_PARAMETERS = {
    "sglang.srt.speculative.spec_info:SpeculativeAlgorithm.register":
        ("name", "supports_overlap", "validate_server_args", "spec_class"),
    "sglang.srt.speculative.spec_registry:CustomSpecAlgo.__init__":
        ("name", "factory", "supports_overlap", "validate_server_args"),
    "sglang.srt.speculative.spec_registry:CustomSpecAlgo.handle_server_args": ("server_args",),
    "sglang.srt.speculative.eagle_worker_common:build_eagle_verify_input":
        ("batch", "draft_input", "parent_list", "top_scores_index", "draft_tokens", "draft_probs",
         "target_worker", "topk", "num_steps", "num_draft_tokens", "tree_mask_mode", "device"),
    "sglang.srt.speculative.eagle_worker_common:run_eagle_verify":
        ("batch", "target_worker", "req_to_token_pool", "token_to_kv_pool_allocator",
         "plan_stream", "plan_stream_ctx", "topk", "num_draft_tokens", "device",
         "metadata_ready_pre_pad", "finalize_tree_path", "grammar_barrier"),
    "sglang.srt.managers.tp_worker:TpModelWorker.forward_batch_generation":
        ("batch", "capture_hidden_mode"),
    "sglang.srt.speculative.base_spec_worker:BaseSpecWorker.note_request_finished":
        ("rid", "natural_stop"),
    # hidden-state drafters: aux layers captured by the target, graphs recaptured after
    "sglang.srt.models.llama:LlamaForCausalLM.set_eagle3_layers_to_capture": ("layer_ids",),
    "sglang.srt.model_executor.model_runner:ModelRunner.recapture_decode_cuda_graph": (),
    # trees: the verify input built from specplug's own tree tensors
    "sglang.srt.speculative.eagle_info:EagleVerifyInput.create_idle_input":
        ("topk", "spec_steps", "num_verify_tokens", "device"),
}

# dataclass fields read or written on SGLang's objects
REQUIRED_FIELDS = {
    "sglang.srt.managers.utils:GenerationBatchResult":
        ("next_token_ids", "accept_lens", "new_seq_lens", "next_draft_input"),
    "sglang.srt.speculative.eagle_info:EagleDraftInput":
        ("bonus_tokens", "topk_p", "topk_index", "hidden_states", "capture_hidden_mode"),
    "sglang.srt.speculative.eagle_info:EagleVerifyInput":
        ("draft_token", "custom_mask", "positions", "retrieve_index", "retrieve_next_token",
         "retrieve_next_sibling", "retrieve_cum_len", "spec_steps", "topk", "draft_token_num",
         "capture_hidden_mode", "seq_lens_sum", "seq_lens_cpu", "draft_probs",
         "prepared_out_cache_loc", "prepared_mrope_positions"),
    "sglang.srt.layers.logits_processor:LogitsProcessorOutput": ("hidden_states",),
}


def sglang_version() -> str:
    import sglang
    return str(getattr(sglang, "__version__", "unknown"))


def version_supported(version: str) -> bool:
    return version in SUPPORTED_VERSIONS


def problems() -> list[str]:
    """Empty when this SGLang is one the plugin supports; else why not, one line each."""
    try:
        version = sglang_version()
    except ImportError as e:
        return [f"SGLang is not importable: {e}"]
    if not version_supported(version):
        return [f"SGLang {version} is not a supported version "
                f"(supported: {', '.join(SUPPORTED_VERSIONS)})"]
    found = []
    for where, names in REQUIRED_PARAMETERS.items():
        found += _check(where, lambda obj, names=names: _missing_parameters(obj, names))
    for where, names in REQUIRED_FIELDS.items():
        found += _check(where, lambda obj, names=names: _missing_fields(obj, names))
    return found


def _check(where: str, missing_of) -> list[str]:
    try:
        missing = missing_of(_resolve(where))
    except (ImportError, AttributeError, TypeError, ValueError) as e:
        return [f"{where}: {type(e).__name__}: {e}"]
    return [f"{where} no longer takes {', '.join(missing)}"] if missing else []


def _resolve(where: str):
    import importlib
    module_name, attr_path = where.split(":")
    obj = importlib.import_module(module_name)
    for part in attr_path.split("."):
        obj = getattr(obj, part)
    return obj


def _missing_parameters(fn, names) -> list[str]:
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    return [n for n in names if n not in params]


def _missing_fields(cls, names) -> list[str]:
    import dataclasses
    fields = {f.name for f in dataclasses.fields(cls)}
    return [n for n in names if n not in fields]
