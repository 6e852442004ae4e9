"""Target hidden states out of vLLM's own forward pass, in HF's `hidden_states` numbering.

vLLM gives a custom_class proposer token ids only.  Drafters that read target features
(`needs.hidden_layers`: EAGLE heads, hybrid) get them here from torch forward hooks on the
target's decoder layers; nothing in vLLM is replaced.

What a hook sees, and why its sum is HF's value: a vLLM Llama-style decoder layer returns
(hidden, residual) with the residual add deferred to the next layer's fused add+RMSNorm, so
after layer i the residual stream HF calls hidden_states[i + 1] is `hidden + residual`.  That
sum is taken inside the hook, before the next layer's in-place fused norm overwrites both
tensors.  HF index 0 (embeddings) is layer 0's input; index L is the final norm's output.

Which positions belong to which request: at the end of each target forward the runner's batch
layout is still in place (`input_batch.req_ids` in row order, `query_start_loc` cumulative
token counts, the forward's `positions`), so every request's slice of the flat token axis is
filed under its request id and positions.  A request's features are kept until the proposer
takes the committed ones: the verified prefix [last token, accepted drafts] of each step.
Rejected drafts' features sit at positions a later forward recomputes (latest write wins).

    capture = TargetFeatures(model, runner, (2, 15, 27))   # once, from load_model
    ... vLLM runs a forward ...
    capture.take(req_id, start, stop)   # [stop - start, 3 * H] for committed positions
"""
from __future__ import annotations

import torch
from torch import nn


class FeatureGap(RuntimeError):
    pass


def decoder_parts(model: nn.Module) -> tuple[nn.Module | None, nn.ModuleList, nn.Module | None]:
    """(embed_tokens, layers, final norm) of a vLLM causal LM (Llama-style `model.model`)."""
    inner = model.get_language_model() if hasattr(model, "get_language_model") else model
    inner = getattr(inner, "model", inner)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(f"{type(model).__name__}: no decoder `model.layers` to read hidden states "
                         "from (specplug reads Llama-style vLLM models)")
    return getattr(inner, "embed_tokens", None), layers, getattr(inner, "norm", None)


class _Rows:
    """Per-request features by position: one buffer covering [offset, offset + len)."""

    def __init__(self):
        self.buf: dict[str, torch.Tensor] = {}  # req_id -> [n, F]
        self.offset: dict[str, int] = {}

    def write(self, req_id: str, start: int, feats: torch.Tensor) -> None:
        old = self.buf.get(req_id)
        if old is None or start < self.offset[req_id] or start > self.offset[req_id] + len(old):
            # first write, a recompute from an earlier position (preemption), or a gap
            self.buf[req_id], self.offset[req_id] = feats.clone(), start
            return
        keep = old[:start - self.offset[req_id]]
        tail = old[start - self.offset[req_id] + len(feats):]
        self.buf[req_id] = torch.cat([keep, feats, tail])

    def take(self, req_id: str, start: int, stop: int) -> torch.Tensor:
        buf, off = self.buf.get(req_id), self.offset.get(req_id, 0)
        if stop <= start:
            return torch.empty(0, 0) if buf is None else buf[:0]
        if buf is None or off > start or off + len(buf) < stop:
            have = "none" if buf is None else f"[{off}, {off + len(buf)})"
            raise FeatureGap(
                f"request {req_id}: target features for positions [{start}, {stop}) were not "
                f"computed by vLLM (have {have}); prefix caching skips them: run with "
                "enable_prefix_caching=False")
        out = buf[start - off:stop - off]
        # everything before `stop` is committed and handed over: keep only what follows
        self.buf[req_id], self.offset[req_id] = buf[stop - off:], stop
        return out

    def drop(self, req_ids) -> None:
        for r in req_ids:
            self.buf.pop(r, None)
            self.offset.pop(r, None)


class TargetFeatures:
    """Forward hooks that file each request's target features for `hf_indices` by position."""

    def __init__(self, model: nn.Module, runner, hf_indices: tuple[int, ...]):
        self.runner = runner
        embed, layers, norm = decoder_parts(model)
        num_layers = self.num_layers = len(layers)
        self.indices = tuple(num_layers if i == -1 else int(i) for i in hf_indices)
        bad = [i for i in self.indices if not 0 <= i <= num_layers]
        if bad:
            raise ValueError(f"hidden state index {bad[0]} is outside the target's 0..{num_layers}")
        if num_layers in self.indices and norm is None:
            raise ValueError(f"hidden state index {num_layers} needs the target's final norm")
        self.rows = _Rows()
        self._now: dict[int, torch.Tensor] = {}  # hf index -> [tokens, H] of the running forward
        self._positions: torch.Tensor | None = None
        self.handles = [model.register_forward_pre_hook(self._begin, with_kwargs=True),
                        model.register_forward_hook(self._end)]
        for i in set(self.indices):
            if i == 0:
                self.handles.append(layers[0].register_forward_pre_hook(self._layer_input))
            elif i == num_layers:
                self.handles.append(norm.register_forward_hook(self._norm_output))
            else:
                self.handles.append(layers[i - 1].register_forward_hook(self._layer_output(i)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    # -- hooks (inside vLLM's forward) --------------------------------------------------------
    def _begin(self, module, args, kwargs):
        self._now = {}
        pos = kwargs.get("positions", args[1] if len(args) > 1 else None)
        self._positions = pos

    def _layer_input(self, module, args):
        # layer 0 gets (positions, hidden = embeddings, residual = None)
        self._now[0] = args[1].clone()

    def _layer_output(self, index: int):
        def hook(module, args, out):
            hidden, residual = out
            self._now[index] = hidden + residual  # a new tensor: later in-place norms can't touch it
        return hook

    def _norm_output(self, module, args, out):
        # final norm(hidden, residual) -> (normed, residual); HF's hidden_states[L] is the normed
        normed = out[0] if isinstance(out, tuple) else out
        self._now[self.num_layers] = normed.clone()

    def _end(self, module, args, out):
        now, positions = self._now, self._positions
        self._now, self._positions = {}, None
        if positions is None or any(i not in now for i in self.indices):
            return  # not a full forward of the target (e.g. a pipeline stage): nothing to file
        batch = self.runner.input_batch
        num_reqs = batch.num_reqs
        if num_reqs == 0:
            return  # vLLM's profiling / warm-up runs
        bounds = self.runner.query_start_loc.np[:num_reqs + 1].tolist()
        if bounds[-1] > positions.shape[-1]:
            return  # the layout is not this forward's (a dummy run): nothing to file
        feats = torch.cat([now[i] for i in self.indices], dim=-1)  # [tokens, n * H]
        pos = positions.reshape(-1)
        for r, req_id in enumerate(batch.req_ids[:num_reqs]):
            a, b = bounds[r], bounds[r + 1]
            if b > a:
                self.rows.write(req_id, int(pos[a]), feats[a:b])

    # -- proposer side ------------------------------------------------------------------------
    def take(self, req_id: str, start: int, stop: int) -> torch.Tensor:
        """[stop - start, n * H] features of committed positions [start, stop) of a request."""
        return self.rows.take(req_id, start, stop)

    def drop(self, req_ids) -> None:
        self.rows.drop(req_ids)
