"""Folding an EAGLE-1 fc bias into layer 0 for vLLM, whose EAGLE-1 fc has no bias.

The head computes x = fc(cat(e, h)) = W [e; h] + b and feeds x to layer 0, which has no
input_layernorm.  x reaches exactly two places before anything nonlinear:
  * the q/k/v projections:  Wq (x' + b) + bq = Wq x' + (bq + Wq b)   (RoPE comes after);
  * the residual stream:    (x' + b) + o_proj(a) = x' + (o_proj(a) + b)
so with x' = W [e; h], the q/k/v biases grow by Wq b, Wk b, Wv b and o_proj gets bias b; from
there on every tensor equals the original.  vLLM's Llama layer has q/k/v biases with `qkv_bias`
and an o_proj bias with `attention_bias` (which it applies to every layer: layers > 0 get zero
biases).  The rewrite is exact in real arithmetic; in floating point the new biases are
computed in float64 and rounded once to the weights' dtype, and an engine sums Wq x' + (Wq b)
instead of Wq (x' + b), so the logits agree to rounding, not bit for bit.  --validate therefore
runs both heads in float64 after a fold, where the only difference left is that one rounding of
the new biases (measured on the test heads, relative to the largest logit: float32 4e-9,
float16 7e-5, bfloat16 3e-4; dropping o_proj's bias alone moves them by 8e-3).
"""
from __future__ import annotations

import dataclasses

import torch

from .spec import ConvertError, DraftSpec

# max |logit diff| / max |logit| allowed by --validate after a fold (float64 forwards), per the
# dtype the weights are stored in
FOLD_RTOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 2e-3}


def needs_fold(spec: DraftSpec, state: dict) -> bool:
    return spec.family == "eagle" and "fc.bias" in state and bool(state["fc.bias"].any())


def fold_fc_bias(spec: DraftSpec, state: dict) -> tuple[DraftSpec, dict]:
    """(spec, canonical state) with a nonzero fc.bias -> the same head without it, q/k/v/o biases
    in every layer (layer 0's carrying the bias)."""
    if spec.arch == "qwen3":
        raise ConvertError("vLLM has no EAGLE-1 head with Qwen3 layers (q_norm/k_norm): use --to specplug")
    b = state["fc.bias"].double()  # [H]
    dtype = state["fc.weight"].dtype
    out = {k: v for k, v in state.items() if k != "fc.bias"}
    for i in range(spec.num_layers):
        p = f"layers.{i}.self_attn."
        for proj in ("q_proj", "k_proj", "v_proj"):
            w = state[p + proj + ".weight"]  # [out, H]
            bias = state.get(p + proj + ".bias", torch.zeros(w.shape[0], dtype=dtype)).double()
            if i == 0:
                bias = bias + w.double() @ b
            out[p + proj + ".bias"] = bias.to(dtype)
        out[p + "o_proj.bias"] = (b if i == 0 else torch.zeros_like(b)).to(dtype)
    folded = dataclasses.replace(spec, fc_bias=False, qkv_bias=True, attn_o_bias=True)
    return folded, out


def fold_tolerance(logits: torch.Tensor, dtype: torch.dtype) -> float:
    """The largest |logit diff| a fold may cause on these float64 logits ([T, V], finite
    entries) when the weights are stored in dtype."""
    return FOLD_RTOL.get(dtype, 2e-3) * max(1.0, float(logits.abs().max()))
