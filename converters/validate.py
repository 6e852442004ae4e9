"""`--validate`: read the written checkpoint back, compare every tensor with the source's, run one
forward of the drafter before and after on random inputs and require equal logits."""
from __future__ import annotations

import torch

from specplug.checkpoint_io import load_state_dict

from .fold import fold_tolerance
from .reference import forward_logits, random_inputs
from .sources import read_dflash, read_eagle, read_eagle3, read_speculators
from .spec import ConvertError, DraftSpec

READ_BACK = {"speculators": {"eagle": read_speculators, "eagle3": read_speculators, "dflash": read_speculators},
             "sglang": {"eagle": read_eagle, "eagle3": read_eagle3, "dflash": read_dflash},
             "specplug": {"eagle": read_eagle, "eagle3": read_eagle3, "dflash": read_dflash}}


def read_back(folder: str, to_format: str, family: str, hints: dict | None = None) -> tuple[DraftSpec, dict]:
    return READ_BACK[to_format][family](folder, hints)


def compare_states(before: dict, after: dict, where: str) -> None:
    """Equal tensors and dtypes.  Allowed differences, each exact by construction: an embedding
    the target format leaves to the engine, and an EAGLE-1 fc bias of zeros added or dropped."""
    for key, t in before.items():
        if key not in after:
            if key == "embed_tokens.weight" or (key == "fc.bias" and not bool(t.any())):
                continue  # left to the engine / a zero bias dropped (vLLM's fc has none)
            raise ConvertError(f"{where}: key {key} is missing after conversion")
        if after[key].dtype != t.dtype or not torch.equal(after[key], t):
            raise ConvertError(f"{where}: key {key} differs after conversion")
    for key in set(after) - set(before):
        if not (key == "fc.bias" and not bool(after[key].any())):
            raise ConvertError(f"{where}: unexpected key {key} after conversion")


def validate_conversion(spec: DraftSpec, state: dict, folder: str, to_format: str, hints: dict,
                        written: tuple[DraftSpec, dict] | None = None) -> float:
    """-> max |logit difference| (0.0: identical).  Raises ConvertError on any mismatch.
    written: the (spec, state) the writer was given when it differs from the source's (an
    EAGLE-1 fc bias folded for vLLM): its tensors must come back exactly, and the logits must
    match the source's to rounding (fold.FOLD_RTOL) instead of bit for bit."""
    written_state = written[1] if written is not None else state
    new_spec, new_state = read_back(folder, to_format, spec.family, hints)
    compare_states(written_state, new_state, folder)
    embed, lm_head = _target_head(spec, hints.get("verifier"), state.get("embed_tokens.weight"))
    if "embed_tokens.weight" in state and "embed_tokens.weight" not in new_state:
        if hints.get("verifier") is None:
            raise ConvertError(f"--to {to_format} leaves the embedding to the target: pass --verifier so "
                               "--validate runs both drafters with the target's embedding")
        new_state = {**new_state, "embed_tokens.weight": embed}  # what the engine will use
    tokens, feats = random_inputs(spec)
    stored, folded = embed.dtype, written_state is not state
    # both forwards in float64: exact for any stored dtype (bf16 heads with an fp32 verifier
    # mix dtypes otherwise), and what fold.py's tolerance is stated for
    state, new_state = _float64(state), _float64(new_state)
    embed, lm_head = embed.double(), lm_head.double()
    feats = feats.to(embed.dtype)
    before = forward_logits(spec, state, embed, lm_head, tokens, feats)
    after = forward_logits(new_spec, new_state, embed, lm_head, tokens, feats)
    finite = torch.isfinite(before)
    if not torch.equal(finite, torch.isfinite(after)):
        raise ConvertError(f"{folder}: the drafter's reachable vocabulary changed after conversion")
    diff = float((before[finite] - after[finite]).abs().max()) if bool(finite.any()) else 0.0
    allowed = fold_tolerance(before[finite], stored) if folded else 0.0
    if diff > allowed:
        raise ConvertError(f"{folder}: drafter logits differ after conversion (max |diff| {diff:.3g}"
                           + (f", allowed {allowed:.3g} after folding fc.bias)" if allowed else ")"))
    return diff


def _float64(state: dict) -> dict:
    return {k: v.double() if v.is_floating_point() else v for k, v in state.items()}


def _target_head(spec: DraftSpec, verifier: str | None, draft_embed: torch.Tensor | None):
    """The target's embedding and lm_head: the verifier's real ones, else seeded random."""
    dtype = draft_embed.dtype if draft_embed is not None else torch.float32
    if verifier is not None:
        st = load_state_dict(verifier)
        embed = st.get("model.embed_tokens.weight", st.get("embed_tokens.weight"))
        if embed is not None:
            return embed.to(dtype), st.get("lm_head.weight", embed).to(dtype)
    g = torch.Generator().manual_seed(1)
    shape = (spec.vocab_size, spec.hidden_size)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)
