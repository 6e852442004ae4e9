"""Target hidden states out of vLLM's own forward pass, in HF's `hidden_states` numbering.

vLLM gives a custom_class proposer token ids only.  Drafters that read target features
(`needs.hidden_layers`: EAGLE heads, hybrid, DFlash) get them the way vLLM's own EAGLE-3 path
does: the target returns auxiliary hidden states as ordinary outputs of its forward
(`set_aux_hidden_state_layers`; vLLM's aux index i is `hidden + residual` after layer i - 1, HF's
hidden_states[i]), so they survive torch.compile and CUDA graphs, where forward hooks would not
run.  What specplug sets on the runner, in the proposer's load_model (which vLLM calls before it
sets up aux outputs and before anything is compiled or captured):
  - use_aux_hidden_state_outputs = True, and the aux layers the drafter needs (vLLM installs
    them itself, with its own support check, right after the proposer's load_model);
  - an instance wrapper around runner._model_forward (documented as an override point) that
    reads the (hidden, aux) output inside the step that computed it: aux buffers are overwritten
    by the next forward.  The output goes back to vLLM unchanged.
HF index 0 (the embeddings) is recomputed from the input ids; index L (after the final norm) is
the forward's own hidden output.

Which positions belong to which request: while _model_forward returns, the runner's batch
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
    """Files each request's target features for `hf_indices` by position, from the output of
    the runner's own forward (vLLM's aux hidden states)."""

    def __init__(self, model: nn.Module, runner, hf_indices: tuple[int, ...]):
        self.runner = runner
        embed, layers, _ = decoder_parts(model)
        num_layers = self.num_layers = len(layers)
        self.indices = tuple(num_layers if i == -1 else int(i) for i in hf_indices)
        bad = [i for i in self.indices if not 0 <= i <= num_layers]
        if bad:
            raise ValueError(f"hidden state index {bad[0]} is outside the target's 0..{num_layers}")
        if 0 in self.indices and embed is None:
            raise ValueError("hidden state index 0 needs the target's input embedding")
        self.embed = embed
        # vLLM returns aux states sorted, one per distinct layer
        self.aux = tuple(sorted({i for i in self.indices if 0 < i < num_layers}))
        if self.aux:
            if not hasattr(model, "set_aux_hidden_state_layers"):
                raise ValueError(f"{type(model).__name__} cannot return auxiliary hidden states "
                                 "(vLLM's SupportsEagle3): specplug drafters that read target "
                                 "features need it")
            runner.use_aux_hidden_state_outputs = True
            # vLLM's own set-up (right after the proposer's load_model) installs these layers
            runner._get_eagle3_aux_layers_from_config = lambda: self.aux
        self.rows = _Rows()
        self._forward = runner._model_forward
        runner._model_forward = self._model_forward

    def _model_forward(self, input_ids=None, positions=None, intermediate_tensors=None,
                       inputs_embeds=None, **kwargs):
        """The runner's forward, unchanged for vLLM; input_ids [tokens], positions [tokens] (flat
        over the batch), output hidden [tokens, H] or (hidden, aux: list of [tokens, H])."""
        out = self._forward(input_ids=input_ids, positions=positions,
                            intermediate_tensors=intermediate_tensors,
                            inputs_embeds=inputs_embeds, **kwargs)
        hidden, aux = out if isinstance(out, tuple) else (out, ())
        if isinstance(hidden, torch.Tensor) and positions is not None and len(aux) == len(self.aux):
            now = dict(zip(self.aux, aux))
            now[self.num_layers] = hidden
            if 0 in self.indices:
                now[0] = inputs_embeds if inputs_embeds is not None else self.embed(input_ids)
            self._file(now, positions)
        return out

    def _file(self, now: dict[int, torch.Tensor], positions: torch.Tensor) -> None:
        batch = self.runner.input_batch
        num_reqs = batch.num_reqs
        if num_reqs == 0:
            return  # vLLM's profiling / warm-up runs
        bounds = self.runner.query_start_loc.np[:num_reqs + 1].tolist()
        if bounds[-1] > positions.shape[-1]:
            return  # the layout is not this forward's (a dummy run): nothing to file
        if bounds[-1] == 0:
            return
        # a new tensor: the aux buffers are overwritten by the next forward
        feats = torch.cat([now[i][:bounds[-1]] for i in self.indices], dim=-1)  # [tokens, n * H]
        pos = positions.reshape(-1)
        # each request's first position, copied to the host once per forward (not once per
        # request: on a GPU each read would be a sync); an empty slice reads a neighbour's
        first = torch.tensor([min(a, bounds[-1] - 1) for a in bounds[:-1]], device=pos.device)
        starts = pos[first].tolist()
        for r, req_id in enumerate(batch.req_ids[:num_reqs]):
            a, b = bounds[r], bounds[r + 1]
            if b > a:
                self.rows.write(req_id, starts[r], feats[a:b])

    # -- proposer side ------------------------------------------------------------------------
    def take(self, req_id: str, start: int, stop: int) -> torch.Tensor:
        """[stop - start, n * H] features of committed positions [start, stop) of a request."""
        return self.rows.take(req_id, start, stop)

    def drop(self, req_ids) -> None:
        self.rows.drop(req_ids)
