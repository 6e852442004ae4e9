"""Linear layers whose weights are packed once for the CPU's matmul library (oneDNN).

`F.linear` on a CPU bf16 weight goes through oneDNN, which reorders the weight into its blocked
layout on every call; an fp32 weight goes through BLAS.  Packing the weight once and calling
oneDNN's linear on the packed copy skips the reorder.  Measured on an AMD EPYC (Zen 5, 2 threads,
one token: the decode step's shapes of SmolLM2-135M), microseconds per call, F.linear / packed:
  bf16 960x576 (q, k, v) 35 / 19; 3072x576 (gate, up) 71 / 40; 49152x576 (lm_head) 1825 / 992
  fp32 the same: 31 / 28; 97 / 56; 7136 / 1489-2758
bf16 outputs are bit-identical to F.linear's.  fp32 ones differ in the last bits (1e-4), and are
the same for a row whatever the batch it comes in, where BLAS's are not (checked at 1-400 rows):
a verify block and a plain step compute a token's logits alike.

Only inference uses the packed copy: with autograd on, on another device or dtype, F.linear
runs.  A weight changed in place (a training step, load_state_dict) or replaced (`.to`) is packed
again on its next call.  The packed copy is extra memory: as much again as the linear weights.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("specplug")

_PACKABLE = (torch.float32, torch.bfloat16)


class PackedLinear(nn.Linear):
    """An nn.Linear (class swapped in by pack_linears: parameters, tied weights and isinstance
    stay) whose inference calls use a oneDNN-packed copy of its weight."""

    _packed: torch.Tensor | None = None
    _packed_key: tuple = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in_features]
        w = self.weight
        if (x.device.type != "cpu" or x.dtype != w.dtype or w.device.type != "cpu"
                or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))):
            return F.linear(x, w, self.bias)
        key = _weight_key(w)
        if key != self._packed_key:
            self._packed, self._packed_key = torch.ops.mkldnn._reorder_linear_weight(w), key
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")

    def __getstate__(self):
        # a oneDNN tensor cannot be copied or pickled: a copy (deepcopy, torch.save) packs its
        # own weight on its first call
        state = dict(self.__dict__)
        state.pop("_packed", None)
        state.pop("_packed_key", None)
        return state


def _weight_key(w: torch.Tensor) -> tuple:
    """What identifies a weight's current values: its storage, dtype and in-place edit count
    (an inference tensor, e.g. a copy made in inference mode, keeps no count)."""
    return w.data_ptr(), w.dtype, -1 if w.is_inference() else w._version


def packing_works(dtype: torch.dtype) -> bool:
    """Whether this torch build and CPU run oneDNN's packed linear in `dtype`, checked against
    F.linear on a small product."""
    if dtype not in _PACKABLE or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        w = torch.randn(48, 32, generator=gen, device="cpu").to(dtype)
        x = torch.randn(3, 32, generator=gen, device="cpu").to(dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w)
        got = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    except (RuntimeError, AttributeError) as e:  # an op missing from this build
        log.info("linear weights stay unpacked (%s): %s", dtype, str(e).splitlines()[0])
        return False
    return torch.allclose(got.float(), F.linear(x, w).float(), rtol=2e-2, atol=2e-2)


def pack_linears(root: nn.Module) -> int:
    """Switch every nn.Linear under `root` whose weight is a CPU fp32/bf16 tensor to
    PackedLinear.  Returns how many were switched (0 where packing does not work here)."""
    found = [m for m in root.modules() if type(m) is nn.Linear
             and m.weight.device.type == "cpu" and not m.weight.is_inference()]
    works = {d: packing_works(d) for d in {m.weight.dtype for m in found}}
    switched = 0
    for module in found:
        if works[module.weight.dtype]:
            module.__class__ = PackedLinear
            switched += 1
    fuse_linears(root)
    return switched


def fuse_linears(root: nn.Module) -> int:
    """Every module under `root` that names linears reading one input (a class attribute
    FUSABLE: attribute -> part names, e.g. q/k/v, gate/up) gets each group as one FusedLinear
    in that attribute, where packing works for the parts' CPU weights.  Returns groups fused."""
    works: dict[torch.dtype, bool] = {}
    fused = 0
    for module in list(root.modules()):
        for attr, names in getattr(type(module), "FUSABLE", {}).items():
            if getattr(module, attr, None) is not None:
                continue
            parts = [getattr(module, name) for name in names]
            w = parts[0].weight
            if w.device.type != "cpu" or any(p.weight.dtype != w.dtype for p in parts):
                continue
            if w.dtype not in works:
                works[w.dtype] = packing_works(w.dtype)
            if works[w.dtype]:
                setattr(module, attr, FusedLinear(parts))
                fused += 1
    return fused


class FusedLinear(nn.Module):
    """Linears that read one input (q/k/v, gate/up) as one packed product, split after: on the
    CPU a one-token product costs about as much per call as per byte (bf16, SmolLM2's shapes:
    q, k, v 18 + 15 + 15 us apart, 21 us as one).  Holds no parameters: `parts` stay the owner's
    modules, and their weights are read (and packed again when changed) like PackedLinear's."""

    def __init__(self, parts: list[nn.Linear]):
        super().__init__()
        self.parts = list(parts)  # a plain list: the owner's modules, not registered twice
        self.sizes = [p.out_features for p in parts]
        self._packed, self._bias, self._key = None, None, ()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [..., in_features] -> one [..., out_features] per part."""
        w = self.parts[0].weight
        if (x.device.type != "cpu" or x.dtype != w.dtype or w.device.type != "cpu"
                or w.dtype not in _PACKABLE or torch.is_grad_enabled()):
            return tuple(p(x) for p in self.parts)
        key = tuple(_weight_key(t) for p in self.parts for t in (p.weight, p.bias)
                    if t is not None)
        if key != self._key:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(
                torch.cat([p.weight for p in self.parts]))
            biases = [p.bias if p.bias is not None else p.weight.new_zeros(p.out_features)
                      for p in self.parts]
            self._bias = torch.cat(biases) if any(p.bias is not None for p in self.parts) else None
            self._key = key
        out = torch.ops.mkldnn._linear_pointwise(x, self._packed, self._bias, "none", [], "")
        return out.split(self.sizes, dim=-1)

    def __getstate__(self):  # see PackedLinear.__getstate__
        state = dict(self.__dict__)
        state["_packed"], state["_bias"], state["_key"] = None, None, ()
        return state
