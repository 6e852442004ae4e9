"""Pure-torch `decode_attention_cpu` / `extend_attention_cpu` with the argument order SGLang's
intel_amx backend passes (layers/attention/intel_amx_backend.py).  Row by row, fp32 softmax."""
from __future__ import annotations

import torch


def _attend(q, k, v, scaling, logit_cap, mask=None, sinks=None):
    """q [nq, Hq, D], k [nk, Hkv, D], v [nk, Hkv, Dv], mask [nq, nk] bool (True = visible)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1).float()  # [nk, Hq, D]
    v = v.repeat_interleave(group, dim=1).float()
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scaling  # [Hq, nq, nk]
    if logit_cap and logit_cap > 0:
        scores = logit_cap * torch.tanh(scores / logit_cap)
    if mask is not None:
        scores = scores.masked_fill(~mask[None], float("-inf"))
    if sinks is not None:  # a per-head logit that takes softmax mass but adds no value
        sink = sinks.float().view(-1, 1, 1).expand(-1, scores.shape[1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v)  # [nq, Hq, Dv]


def _window_mask(q_pos, k_pos, window):
    """Causal visibility, limited to the last `window` positions when window > 0."""
    visible = k_pos[None, :] <= q_pos[:, None]
    if window and window > 0:
        visible &= k_pos[None, :] > q_pos[:, None] - window
    return visible


def decode_attention_cpu(q, k_buffer, v_buffer, k_scale, v_scale, o, k_new, v_new, cache_loc,
                         attn_logits, req_to_token, req_pool_indices, seq_lens, scaling,
                         logit_cap, is_cross_attention, sliding_window, encoder_lens, sinks):
    """One query token per row; seq_lens include it.  When k_new/v_new are given the kernel
    writes them to the cache at cache_loc first (the backend leaves that write to it)."""
    if k_new is not None and v_new is not None:
        k_buffer[cache_loc.long()] = k_new.view(-1, *k_buffer.shape[1:]).to(k_buffer.dtype)
        v_buffer[cache_loc.long()] = v_new.view(-1, *v_buffer.shape[1:]).to(v_buffer.dtype)
    for i in range(q.shape[0]):
        n = int(seq_lens[i])
        slots = req_to_token[int(req_pool_indices[i]), :n].long()
        k = k_buffer[slots].float() * (k_scale or 1.0)
        v = v_buffer[slots].float() * (v_scale or 1.0)
        mask = None
        if sliding_window and sliding_window > 0:
            mask = _window_mask(torch.tensor([n - 1]), torch.arange(n), sliding_window)
        o[i] = _attend(q[i:i + 1], k, v, scaling, logit_cap, mask, sinks)[0].to(o.dtype)


def extend_attention_cpu(q, k, v, o, k_buffer, v_buffer, k_scale, v_scale, req_to_token,
                         req_pool_indices, seq_lens, extend_seq_lens, extend_start_loc,
                         max_extend_len, scaling, logit_cap, is_cross_attention, sliding_window,
                         encoder_lens, sinks, tree_mask, is_causal):
    """Row i extends its cached prefix (seq_lens[i] - extend_seq_lens[i] tokens, read through
    req_to_token) by extend_seq_lens[i] new tokens (q/k/v rows from extend_start_loc[i]).
    tree_mask, when given, is the QLEN_ONLY layout: row i's [n, n] visibility among its new
    tokens, flattened, rows packed back to back; the prefix is always visible."""
    mask_offset = 0
    for i in range(seq_lens.shape[0]):
        total, n = int(seq_lens[i]), int(extend_seq_lens[i])
        start, prefix = int(extend_start_loc[i]), total - n
        slots = req_to_token[int(req_pool_indices[i]), :prefix].long()
        k_new = k[start:start + n] if k is not None else k_buffer[
            req_to_token[int(req_pool_indices[i]), prefix:total].long()]
        v_new = v[start:start + n] if v is not None else v_buffer[
            req_to_token[int(req_pool_indices[i]), prefix:total].long()]
        keys = torch.cat([k_buffer[slots].float() * (k_scale or 1.0), k_new.float()])
        values = torch.cat([v_buffer[slots].float() * (v_scale or 1.0), v_new.float()])
        q_pos = torch.arange(prefix, total)
        k_pos = torch.arange(total)
        if is_causal:
            mask = _window_mask(q_pos, k_pos, sliding_window)
        else:
            mask = torch.ones(n, total, dtype=torch.bool)
        if tree_mask is not None:
            tree = tree_mask[mask_offset:mask_offset + n * n].view(n, n).bool()
            mask[:, prefix:] = tree
            mask_offset += n * n
        out = _attend(q[start:start + n], keys, values, scaling, logit_cap, mask, sinks)
        o[start:start + n] = out.to(o.dtype)
