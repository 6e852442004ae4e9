"""A plain-torch forward of each drafter family over canonical weights, for `--validate`.

It is a reference, not a serving path: full-sequence, no cache.  Every weight is used in its
documented role, so a mapping that swaps two same-shaped tensors changes the logits.
  eagle   x = fc(cat(embed(tok), h)); decoder layers (layer 0 without input norm); no final norm;
          logits = target lm_head(x)                          tok [T], h [T, H]
  eagle3  z = fc(feats); x = resid + attn(cat(in_norm(embed), hidden_norm(z))) ...; norm; own
          lm_head over the draft vocab, scattered into the target vocab by d2t   feats [T, n*Ht]
  dflash  ctx = hidden_norm(fc(feats)); block queries attend to cat(ctx, block), non-causal;
          norm; target lm_head                          block tok [B], feats [Tc, n*Ht]
"""
from __future__ import annotations

import torch

from .spec import DraftSpec


def _rms(x, w, eps):
    xf = x.double()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def _rope(x, pos, theta):  # x [heads, T, hd]
    hd = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = pos.double()[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(x.dtype), torch.cat([ang.sin()] * 2, -1).to(x.dtype)
    half = torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1)
    return x * cos + half * sin


def _lin(st, name, x):
    y = x @ st[name + ".weight"].T
    return y + st[name + ".bias"] if name + ".bias" in st else y


def _attn(st, p, spec: DraftSpec, q_in, kv_in, q_pos, kv_pos, causal):
    hd, nh, nkv = spec.head_dim, spec.num_heads, spec.num_kv_heads
    q = _lin(st, p + "self_attn.q_proj", q_in).view(-1, nh, hd).transpose(0, 1)
    k = _lin(st, p + "self_attn.k_proj", kv_in).view(-1, nkv, hd).transpose(0, 1)
    v = _lin(st, p + "self_attn.v_proj", kv_in).view(-1, nkv, hd).transpose(0, 1)
    if p + "self_attn.q_norm.weight" in st:
        q = _rms(q, st[p + "self_attn.q_norm.weight"], spec.rms_norm_eps)
        k = _rms(k, st[p + "self_attn.k_norm.weight"], spec.rms_norm_eps)
    q, k = _rope(q, q_pos, spec.rope_theta), _rope(k, kv_pos, spec.rope_theta)
    k, v = k.repeat_interleave(nh // nkv, 0), v.repeat_interleave(nh // nkv, 0)
    scores = q @ k.transpose(1, 2) / hd ** 0.5
    if causal:
        scores = scores.masked_fill(kv_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(0, 1).reshape(q_in.shape[0], nh * hd)
    return _lin(st, p + "self_attn.o_proj", out)


def _mlp(st, p, x):
    gate = _lin(st, p + "mlp.gate_proj", x)
    return _lin(st, p + "mlp.down_proj", torch.nn.functional.silu(gate) * _lin(st, p + "mlp.up_proj", x))


def _after_attn(st, p, spec, x):
    return x + _mlp(st, p, _rms(x, st[p + "post_attention_layernorm.weight"], spec.rms_norm_eps))


@torch.no_grad()
def forward_logits(spec: DraftSpec, st: dict, embed: torch.Tensor, lm_head: torch.Tensor,
                   tokens: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """-> [T, target vocab] logits.  embed/lm_head [V, H] are the target's (the draft's own
    embed_tokens wins when present); tokens [T]; feats [T or Tc, fc input]."""
    eps = spec.rms_norm_eps
    E = st.get("embed_tokens.weight", embed)
    if spec.family == "eagle":
        x = _lin(st, "fc", torch.cat([E[tokens], feats], -1))
        pos = torch.arange(tokens.shape[0])
        for i in range(spec.num_layers):
            p = f"layers.{i}."
            a = x if i == 0 else _rms(x, st[p + "input_layernorm.weight"], eps)
            x = _after_attn(st, p, spec, x + _attn(st, p, spec, a, a, pos, pos, causal=True))
        return x @ lm_head.T
    if spec.family == "eagle3":
        p, pos = "layers.0.", torch.arange(tokens.shape[0])
        z = _lin(st, "fc", feats)
        hn = _rms(z, st[p + "hidden_norm.weight"], eps)
        a = torch.cat([_rms(E[tokens], st[p + "input_layernorm.weight"], eps), hn], -1)
        resid = hn if spec.norm_before_residual else z
        x = _after_attn(st, p, spec, resid + _attn(st, p, spec, a, a, pos, pos, causal=True))
        draft = _rms(x, st["norm.weight"], eps) @ st["lm_head.weight"].T
        out = draft.new_full((draft.shape[0], spec.vocab_size), float("-inf"))
        out[:, torch.arange(st["d2t"].shape[0]) + st["d2t"]] = draft
        return out
    ctx = _rms(_lin(st, "fc", feats), st["hidden_norm.weight"], eps)
    x = E[tokens]
    ctx_pos = torch.arange(ctx.shape[0])
    q_pos = ctx.shape[0] + torch.arange(tokens.shape[0])
    for i in range(spec.num_layers):
        p = f"layers.{i}."
        a = _rms(x, st[p + "input_layernorm.weight"], eps)
        kv = torch.cat([ctx, a], 0)
        x = _after_attn(st, p, spec, x + _attn(st, p, spec, a, kv, q_pos, torch.cat([ctx_pos, q_pos]), causal=False))
    return _rms(x, st["norm.weight"], eps) @ lm_head.T


def random_inputs(spec: DraftSpec, seed: int = 0, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [T] and the target features the family reads, in the weights' dtype."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, spec.vocab_size, (length,), generator=g)
    width = {"eagle": spec.hidden_size, "eagle3": spec.num_aux * spec.target_hidden,
             "dflash": len(spec.target_layer_ids or []) * spec.target_hidden}[spec.family]
    n_feats = length + 3 if spec.family == "dflash" else length  # DFlash: context longer than the block
    return tokens, torch.randn(n_feats, width, generator=g)
