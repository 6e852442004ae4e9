"""Tests-only, run in the SGLang venv: SGLang's own DFlashDraftModel on a converted checkpoint.

SGLang 0.5.23 refuses `--speculative-algorithm DFLASH` on CPU at argument resolution, so its
DFlash worker cannot run here.  This builds the worker's model class directly, loads the
checkpoint through the class's own `load_weights` one key at a time (recording which parameter
loader each key reached), and computes block logits the way the worker does: context K/V from
`project_target_hidden` -> `kv_proj_only` -> `apply_k_norm` -> `apply_k_rope`, then the model's
`forward` over the embedded block.  Only the attention kernel is replaced (RadixAttention needs
the engine's KV pool): every block query sees every context key and every block key.

    python dflash_block_logits.py DRAFT_DIR TARGET_DIR INPUTS.safetensors OUT_DIR

INPUTS holds, per row r: feats.r [n, F] target features, ctx_pos.r [n], ids.r [B] block ids,
pos.r [B].  OUT_DIR gets logits.safetensors (logits.r [B, vocab], float64) and load.json
({"calls": {key: loader calls}, "unloaded": [parameters still NaN], "params": [...]}).
"""
from __future__ import annotations

import json
import os
import sys

import torch


class ContextAttention(torch.nn.Module):
    """Stands in for RadixAttention: q [B, heads * d] over [context keys, block keys]."""

    def __init__(self, attn, ctx_k: torch.Tensor, ctx_v: torch.Tensor):
        super().__init__()  # attn: the layer's DFlashAttention (heads, scaling)
        self.heads, self.kv_heads = attn.num_heads, attn.num_kv_heads
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.ctx_k, self.ctx_v = ctx_k, ctx_v  # [n, kv_heads, d]

    def forward(self, q, k, v, forward_batch=None, **_):
        d, groups = self.head_dim, self.heads // self.kv_heads
        q = q.view(-1, self.heads, d).transpose(0, 1)  # [heads, B, d]
        keys = torch.cat([self.ctx_k, k.view(-1, self.kv_heads, d)], 0)
        values = torch.cat([self.ctx_v, v.view(-1, self.kv_heads, d)], 0)
        keys = keys.transpose(0, 1).repeat_interleave(groups, 0)  # [heads, n + B, d]
        values = values.transpose(0, 1).repeat_interleave(groups, 0)
        weights = torch.softmax((q @ keys.transpose(1, 2)) * self.scaling, dim=-1)
        return (weights @ values).transpose(0, 1).reshape(q.shape[1], -1)


def load_counting(model, state: dict) -> tuple[dict, list[str]]:
    """Feed keys one at a time through model.load_weights; count loader calls per key."""
    from sglang.srt.model_loader.weight_utils import default_weight_loader
    calls: list[str] = []
    for name, param in model.named_parameters():
        inner = getattr(param, "weight_loader", default_weight_loader)
        param.data.fill_(float("nan"))  # a parameter no key reaches stays NaN

        def record(p, *args, _inner=inner, _name=name, **kw):
            calls.append(_name)
            return _inner(p, *args, **kw)
        param.weight_loader = record
    per_key = {}
    for key, tensor in state.items():
        before = len(calls)
        model.load_weights([(key, tensor)])
        per_key[key] = len(calls) - before
    unloaded = [n for n, p in model.named_parameters() if bool(torch.isnan(p).any())]
    return per_key, unloaded


@torch.no_grad()
def block_logits(model, embed: torch.Tensor, lm_head: torch.Tensor, feats, ctx_pos, ids, pos):
    """One row: feats [n, F], ctx_pos [n], ids [B], pos [B] -> logits [B, vocab]."""
    ctx = model.project_target_hidden(feats.float())
    for layer in model.layers:
        attn = layer.self_attn
        k, v = attn.kv_proj_only(model.prepare_context_hidden_for_kv(layer, ctx))
        k = attn.apply_k_rope(ctx_pos, attn.apply_k_norm(k))
        attn.attn = ContextAttention(attn, k.view(-1, attn.num_kv_heads, attn.head_dim),
                                     v.view(-1, attn.num_kv_heads, attn.head_dim))
    out = model(ids, pos, forward_batch=None, input_embeds=embed[ids].float())
    return out.hidden_states.double() @ lm_head.double().T


def main(draft: str, target: str, inputs_path: str, out_dir: str) -> int:
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    from sglang.srt.runtime_context import get_context, get_parallel
    get_context().override_server_args(device="cpu").install()
    # one process, no tensor parallelism: the row-parallel layers only read that there is no group
    get_parallel().override_permanently(tp_group=None)
    from sglang.srt.models.dflash import DFlashDraftModel

    model = DFlashDraftModel(AutoConfig.from_pretrained(draft)).float().eval()
    calls, unloaded = load_counting(model, load_file(os.path.join(draft, "model.safetensors")))
    target_state = load_file(os.path.join(target, "model.safetensors"))
    embed, head = target_state["model.embed_tokens.weight"], target_state["lm_head.weight"]
    inputs = load_file(inputs_path)
    rows = sorted({k.split(".")[1] for k in inputs})
    logits = {f"logits.{r}": block_logits(model, embed, head, inputs[f"feats.{r}"],
                                          inputs[f"ctx_pos.{r}"], inputs[f"ids.{r}"],
                                          inputs[f"pos.{r}"]).contiguous() for r in rows}
    os.makedirs(out_dir, exist_ok=True)
    save_file(logits, os.path.join(out_dir, "logits.safetensors"))
    with open(os.path.join(out_dir, "load.json"), "w") as f:
        json.dump({"calls": calls, "unloaded": unloaded, "class": type(model).__name__,
                   "params": [n for n, _ in model.named_parameters()]}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
