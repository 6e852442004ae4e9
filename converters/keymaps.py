"""Applying explicit key maps and checking every tensor, nanoGPT style.

A key map is {source key: destination key}.  Applying one is strict: a source key that is not in
the map and not explicitly dropped is an error, a mapped key that is missing is an error, and the
number of keys out must equal the number expected.  Shapes, dtypes and values are checked against
the canonical shape table (`spec.canonical_shapes`), naming the key on failure.
"""
from __future__ import annotations

import re

import torch

from .spec import INDEX_KEYS, ConvertError, DraftSpec, canonical_shapes

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Buffers some exporters save that no loader wants: rotary caches from older transformers.
ROTARY_BUFFER = re.compile(r"(^|\.)rotary_emb\.(inv_freq|cos_cached|sin_cached)$")


def apply_key_map(state: dict[str, torch.Tensor], key_map: dict[str, str], where: str,
                  drops: tuple[re.Pattern, ...] = (), optional: set[str] = frozenset()
                  ) -> dict[str, torch.Tensor]:
    """Rename state by key_map.  drops: patterns of source keys thrown away on purpose.
    optional: destination keys that may be absent (e.g. an embedding the engine shares)."""
    kept = {k: v for k, v in state.items() if not any(p.search(k) for p in drops)}
    extra = sorted(k for k in kept if k not in key_map)
    if extra:
        raise ConvertError(f"{where}: unexpected key {extra[0]}" + _more(extra))
    missing = [src for src, dst in key_map.items() if src not in kept and dst not in optional]
    if missing:
        raise ConvertError(f"{where}: missing key {missing[0]}" + _more(missing))
    out = {key_map[k]: v for k, v in kept.items()}
    expected = sum(1 for src in key_map if src in kept)
    assert len(out) == expected == len(kept), f"{where}: key count {len(out)} != {expected}"
    return out


def _more(keys: list) -> str:
    return f" (+{len(keys) - 1} more)" if len(keys) > 1 else ""


def check_canonical(state: dict[str, torch.Tensor], spec: DraftSpec, where: str) -> None:
    """Every key present with its shape, float weights finite, d2t/t2d integer/bool and valid."""
    shapes = canonical_shapes(spec)
    missing = [k for k in shapes if k not in state]
    if missing:
        raise ConvertError(f"{where}: missing key {missing[0]}" + _more(missing))
    extra = [k for k in state if k not in shapes]
    if extra:
        raise ConvertError(f"{where}: unexpected key {extra[0]}" + _more(extra))
    assert len(state) == len(shapes), f"{where}: {len(state)} keys, expected {len(shapes)}"
    for key, shape in shapes.items():
        t = state[key]
        if tuple(t.shape) != tuple(shape):
            raise ConvertError(f"{where}: key {key} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if key in INDEX_KEYS:
            continue
        if t.dtype not in FLOAT_DTYPES:
            raise ConvertError(f"{where}: key {key} has dtype {_name(t.dtype)}, expected a float type")
        if not bool(torch.isfinite(t).all()):
            bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
            raise ConvertError(f"{where}: key {key} contains {bad} values")
    if spec.family == "eagle3":
        check_vocab_map(state["d2t"], state["t2d"], spec.vocab_size, where)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def normalize_vocab_map(d2t: torch.Tensor | None, t2d: torch.Tensor | None, where: str
                        ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """d2t to int64 offsets, t2d to bool; refuse float tensors (a float d2t is a wrong file)."""
    if d2t is not None:
        if d2t.dtype.is_floating_point or d2t.dtype == torch.bool:
            raise ConvertError(f"{where}: key d2t has dtype {_name(d2t.dtype)}, expected int64 offsets")
        d2t = d2t.to(torch.int64)
    if t2d is not None:
        if t2d.dtype.is_floating_point:
            raise ConvertError(f"{where}: key t2d has dtype {_name(t2d.dtype)}, expected bool")
        if t2d.dtype != torch.bool:
            if bool(((t2d != 0) & (t2d != 1)).any()):
                raise ConvertError(f"{where}: key t2d holds values other than 0/1")
            t2d = t2d.to(torch.bool)
    return d2t, t2d


def check_vocab_map(d2t: torch.Tensor, t2d: torch.Tensor, vocab: int, where: str) -> None:
    """d2t offsets must land inside the target vocabulary, on distinct ids, exactly those t2d marks."""
    if d2t.dtype != torch.int64:
        raise ConvertError(f"{where}: key d2t has dtype {_name(d2t.dtype)}, expected int64")
    if t2d.dtype != torch.bool:
        raise ConvertError(f"{where}: key t2d has dtype {_name(t2d.dtype)}, expected bool")
    ids = torch.arange(d2t.shape[0]) + d2t
    if d2t.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ConvertError(f"{where}: d2t maps draft ids outside the target vocabulary of {vocab}")
    if ids.unique().numel() != ids.numel():
        raise ConvertError(f"{where}: d2t maps two draft ids to the same target id")
    marked = torch.zeros(vocab, dtype=torch.bool)
    marked[ids] = True
    if not torch.equal(marked, t2d):
        raise ConvertError(f"{where}: t2d does not mark exactly the target ids d2t maps to")


def t2d_from_d2t(d2t: torch.Tensor, vocab: int) -> torch.Tensor:  # [vocab] bool
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[torch.arange(d2t.shape[0]) + d2t] = True
    return t2d
