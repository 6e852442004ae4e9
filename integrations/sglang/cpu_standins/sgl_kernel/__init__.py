"""CPU stand-ins (pure torch) for the few `sgl_kernel` CPU ops SGLang's speculative path uses.

No CPU build of sgl_kernel exists on PyPI.  With SGLANG_USE_CPU_ENGINE=1 SGLang imports these
names from `sgl_kernel` and calls two attention ops through `torch.ops.sgl_kernel`.  Each function
follows the semantics of the Triton kernel of the same name in SGLang's `kernels/ops/` (written
here from that description, as loops: correct, not fast).  Any other name raises ImportError,
so SGLang's own fallbacks engage.  Imported only where specplug.integrations.sglang.cpu puts
this folder on PYTHONPATH; the plugin itself never imports it.
"""
from __future__ import annotations

import ctypes

import torch

from .attention import decode_attention_cpu, extend_attention_cpu
from .tree import build_tree_kernel_efficient_cpu, verify_tree_greedy_cpu

__version__ = "0.0.0+specplug.cpu.shim"


def _rows(t: torch.Tensor) -> list[int]:
    return [int(x) for x in t.reshape(-1).tolist()]


def copy_all_layer_kv_cache_cpu(data_ptrs, strides, tgt_loc, src_loc):
    """For every KV buffer (one raw pointer per layer and K/V), copy row src_loc[j] to tgt_loc[j]."""
    for ptr, stride in zip(_rows(data_ptrs), _rows(strides)):
        for src, tgt in zip(_rows(src_loc), _rows(tgt_loc)):
            ctypes.memmove(ptr + tgt * stride, ptr + src * stride, stride)


def assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start_offset, end_offset,
                                 out_cache_loc, pool_len):
    """req_to_token[req, start:end] = the next (end - start) entries of out_cache_loc, per row."""
    offset = 0
    for req, start, end in zip(_rows(req_pool_indices), _rows(start_offset), _rows(end_offset)):
        n = end - start
        req_to_token[req, start:end] = out_cache_loc[offset:offset + n].to(req_to_token.dtype)
        offset += n


def assign_extend_cache_locs_cpu(req_pool_indices, req_to_token, start_offset, end_offset,
                                 out_cache_loc, pool_len):
    """The reverse gather: out_cache_loc (packed by row) = req_to_token[req, start:end]."""
    offset = 0
    for req, start, end in zip(_rows(req_pool_indices), _rows(start_offset), _rows(end_offset)):
        n = end - start
        out_cache_loc[offset:offset + n] = req_to_token[req, start:end].to(out_cache_loc.dtype)
        offset += n


def assign_draft_cache_locs_contiguous_cpu(req_pool_indices, req_to_token, seq_lens,
                                           out_cache_loc, pool_len, topk, num_cols):
    """Row i's topk * num_cols slots that follow its committed tokens, packed row by row."""
    width = topk * num_cols
    for i, (req, start) in enumerate(zip(_rows(req_pool_indices), _rows(seq_lens))):
        out_cache_loc[i * width:(i + 1) * width] = req_to_token[req, start:start + width]


def fill_bonus_tokens_cpu(accept_tokens, accept_lens, bonus_tokens, accept_stride):
    """bonus[i] = the last accepted token of row i (accept lengths include the bonus)."""
    flat = accept_tokens.reshape(-1)
    for i, n in enumerate(_rows(accept_lens)):
        bonus_tokens[i] = flat[accept_stride * i + n - 1]


def fill_accept_out_cache_loc_cpu(accept_index, out_cache_loc, accept_out_cache_loc):
    """Pack the cache slots of accepted nodes (accept_index != -1), in order."""
    flat = accept_index.reshape(-1)
    kept = flat[flat != -1].long()
    accept_out_cache_loc[:kept.numel()] = out_cache_loc[kept]


def build_draft_decode_metadata_cpu(req_to_token, req_pool_indices, seq_lens, topk, num_steps,
                                    pool_len):
    """[bs * topk, pool_len] token tables for multi-step tree drafting: branch t of row i sees the
    row's committed slots, then its own draft slots (laid out t * num_steps + step after them)."""
    bs = seq_lens.shape[0]
    out = torch.zeros((bs * topk, pool_len), dtype=req_to_token.dtype, device=req_to_token.device)
    for i, (req, n) in enumerate(zip(_rows(req_pool_indices), _rows(seq_lens))):
        for t in range(topk):
            row = out[i * topk + t]
            row[:n] = req_to_token[req, :n]
            start = n + t * num_steps
            row[n:n + num_steps] = req_to_token[req, start:start + num_steps]
    return out


def _register_torch_ops() -> None:
    # SGLang calls these through torch.ops.sgl_kernel; the namespace object keeps attributes set
    # on it, so plain functions serve (no schema needed: nothing here is compiled or traced).
    namespace = torch.ops.sgl_kernel
    setattr(namespace, "decode_attention_cpu", decode_attention_cpu)
    setattr(namespace, "extend_attention_cpu", extend_attention_cpu)


_register_torch_ops()


def __getattr__(name):
    # `from sgl_kernel import X` turns this AttributeError into ImportError, which SGLang's own
    # try/except fallbacks expect for ops a CPU build would not have.
    raise AttributeError(f"sgl_kernel CPU test shim has no {name!r}")
