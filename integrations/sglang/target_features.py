"""Target hidden states out of SGLang's own forward, in HF's `hidden_states` numbering.

SGLang feeds its EAGLE-3 / DFlash workers the same way: the target captures auxiliary hidden
states as outputs of its forward (`set_eagle3_layers_to_capture`; capturing at layer i keeps
`hidden + residual` entering layer i, HF's hidden_states[i]) and the logits processor returns
them packed, in layer order, as `logits_output.hidden_states` whenever a forward runs with
CaptureHiddenMode.FULL.  Without aux layers FULL returns the final normed hidden state (HF index
L).  No forward hooks: the states are graph outputs, so they survive CUDA graph replay (the
graphs are recaptured after the layers are set, see install()).

Which positions each step hands over (spec v2: `seq_lens` excludes the last committed token,
which the target has not run on yet):
  prefill  request i's extend tokens, positions [prefix_lens[i], prefix_lens[i] + extend_lens[i])
  verify   the accepted path of each row's block (SGLang compacts a tree's path to the front),
           positions [seq_lens[i], seq_lens[i] + accept_lens[i]): the old root plus the
           accepted drafts; the bonus token is not run until the next verify.
Together they cover [0, num_committed - 1), DraftInput's contract for hidden_states.

    tap = FeatureTap(model_runner.model, num_layers=30, hf_indices=(3, 16, 28), device=dev)
    tap.install(model_runner)          # before the first forward of a hidden-state drafter
    tap.file(rid, start, tap.select(logits_output.hidden_states[a:b]))
    start, feats = tap.take(rid, stop)  # feats [stop - start, 3 * H]
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("specplug.sglang")


class FeatureTap:
    """Selects the target layers a drafter reads and files their states per request."""

    def __init__(self, model, num_layers: int, hf_indices: tuple[int, ...], device=None):
        self.model = model
        self.device = device  # the target's: even an empty hand-over lives there
        self.indices = tuple(num_layers if i == -1 else int(i) for i in hf_indices)
        bad = [i for i in self.indices if not 0 <= i <= num_layers]
        if bad:
            raise ValueError(f"hidden state index {bad[0]} is outside the target's 0..{num_layers}")
        final = num_layers in self.indices
        # SGLang captures each distinct layer once, in layer order
        self.aux = tuple(sorted(set(self.indices))) if not final else ()
        if final and len(set(self.indices)) > 1:
            raise ValueError(
                f"the drafter reads hidden states {self.indices}: SGLang returns either the final "
                "hidden state or intermediate layers from one forward, not both")
        if self.aux and not hasattr(model, "set_eagle3_layers_to_capture"):
            raise ValueError(f"{type(model).__name__} cannot capture intermediate hidden states "
                             "(SGLang's set_eagle3_layers_to_capture): specplug drafters that read "
                             "them need it")
        # packed column block of each requested index (duplicates allowed)
        blocks = [self.aux.index(i) if self.aux else 0 for i in self.indices]
        self._blocks = None if blocks == list(range(len(blocks))) else blocks
        # request id -> (first position, feature blocks) filed but not handed over yet
        self._pending: dict[str, tuple[int, list[torch.Tensor]]] = {}
        self._next: dict[str, int] = {}  # request id -> first position not handed over

    def install(self, model_runner) -> None:
        """Ask the target for the aux layers; recapture decode graphs already captured without
        them (a graph replays exactly what it captured)."""
        if not self.aux:
            return
        # SGLang's layer ids count layer outputs: id k captures at layer k + 1 (HF index k + 1)
        self.model.set_eagle3_layers_to_capture([i - 1 for i in self.aux])
        graphs = getattr(model_runner, "decode_cuda_graph_runner", None)
        if graphs is not None and graphs is not getattr(model_runner, "eager_runner", None):
            model_runner.recapture_decode_cuda_graph()
            log.info("specplug: decode graphs recaptured with aux hidden states %s", self.aux)

    def select(self, packed: torch.Tensor) -> torch.Tensor:
        """packed [tokens, len(aux) * H] (or [tokens, H]) -> [tokens, len(indices) * H], as a new
        tensor: SGLang's output buffers are reused by the next forward."""
        if self._blocks is None:
            return packed.clone()
        h = packed.shape[-1] // max(len(self.aux), 1)
        return torch.cat([packed[:, b * h:(b + 1) * h] for b in self._blocks], dim=-1)

    # -- per request ----------------------------------------------------------------------------
    def file(self, rid: str, start: int, feats: torch.Tensor) -> None:
        """feats [n, F] of positions [start, start + n) of request rid, already selected.
        Positions filed before are skipped (a retracted request is prefilled again: same
        values); a gap is an error."""
        first, blocks = self._pending.get(rid, (self._next.get(rid, 0), []))
        end = first + sum(len(b) for b in blocks)
        if start > end:
            raise RuntimeError(f"request {rid}: target features jump from position {end} to "
                               f"{start} (a cached prefix is never run through the target: "
                               "serve hidden-state drafters with --disable-radix-cache)")
        feats = feats[end - start:]
        if len(feats):
            self._pending[rid] = (first, blocks + [feats])

    def take(self, rid: str, stop: int) -> tuple[int, torch.Tensor]:
        """(start, [stop - start, F]): the features of rid not handed over yet, up to `stop`."""
        first, blocks = self._pending.pop(rid, (self._next.get(rid, 0), []))
        feats = torch.cat(blocks) if len(blocks) > 1 else (blocks[0] if blocks else None)
        have = 0 if feats is None else len(feats)
        if first + have < stop:
            raise RuntimeError(f"request {rid}: target features for positions [{first}, {stop}) "
                               f"were not computed by SGLang (have [{first}, {first + have}))")
        if first + have > stop:
            self._pending[rid] = (stop, [feats[stop - first:]])
        self._next[rid] = stop
        if feats is None:
            return first, torch.empty(0, 0, device=self.device)
        return first, feats[:stop - first]

    def drop(self, rid: str) -> None:
        self._pending.pop(rid, None)
        self._next.pop(rid, None)

    def clear(self) -> None:
        self._pending.clear()
        self._next.clear()
