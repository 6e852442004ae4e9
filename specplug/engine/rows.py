"""Per-request state of the embedded engine: committed tokens, stop handling, outputs."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Request:
    prompt_ids: list[int]
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    seed: int | None = None
    prompt: str = ""


@dataclass
class RequestOutput:
    prompt: str
    prompt_ids: list[int]
    output_token_ids: list[int]
    output_text: str
    accept_lengths: list[int]
    finish_reason: str  # "length" | "eos" | "stop"

    @property
    def num_new_tokens(self) -> int:
        return len(self.output_token_ids)


@dataclass
class Row:
    row_id: int
    req: Request
    tokens: list[int]  # committed: prompt + output
    generator: torch.Generator | None
    pending_hidden: list[torch.Tensor] = field(default_factory=list)  # features not yet handed over
    hidden_start: int = 0  # position of pending_hidden's first feature
    accept_lengths: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    drafted_upto: int = 0  # committed tokens at the row's last draft call
    # the committed tokens as a CPU tensor, grown in place: handing them to a drafter copies
    # only the tokens committed since the last call
    _ids: torch.Tensor | None = field(default=None, repr=False)
    _ids_filled: int = 0

    def committed_ids(self) -> torch.Tensor:
        """[num_committed] int64 on the CPU: a view of this row's buffer (O(new) per call)."""
        n = len(self.tokens)
        if self._ids is None or self._ids.shape[0] < n:
            room = max(n, len(self.req.prompt_ids) + self.req.max_new_tokens + 1)
            grown = torch.empty(room, dtype=torch.long, device="cpu")
            if self._ids is not None:
                grown[:self._ids_filled] = self._ids[:self._ids_filled]
            self._ids = grown
        if self._ids_filled < n:
            self._ids[self._ids_filled:n] = torch.tensor(self.tokens[self._ids_filled:n],
                                                         dtype=torch.long, device="cpu")
            self._ids_filled = n
        return self._ids[:n]

    def new_since_last_draft(self) -> int:
        """Tokens committed since the row's last draft call (all of them before its first);
        marks this call as the last."""
        n, self.drafted_upto = len(self.tokens) - self.drafted_upto, len(self.tokens)
        return n

    def backlog(self) -> int:
        """Tokens the drafter would take in before this row's next draft beyond the last step's
        own (all of them before its first draft; after steps it was not drafted for, theirs)."""
        if not self.accept_lengths or self.drafted_upto == 0:
            return len(self.tokens) - self.drafted_upto
        return max(0, len(self.tokens) - self.drafted_upto - self.accept_lengths[-1])

    @property
    def num_new(self) -> int:
        return len(self.tokens) - len(self.req.prompt_ids)

    def take_hidden(self) -> torch.Tensor | None:
        if not self.pending_hidden:
            return None
        feats = torch.cat(self.pending_hidden)
        self.hidden_start += feats.shape[0]
        self.pending_hidden = []
        return feats

    def append(self, new_tokens: list[int], eos_ids: set[int], tokenizer) -> int:
        """Commit tokens one by one, ending the row at EOS, a stop string or the length limit.
        Returns how many were committed."""
        for i, tok in enumerate(new_tokens):
            self.tokens.append(tok)
            if tok in eos_ids:
                self.finish_reason = "eos"
            elif self.req.stop and _ends_with_stop(self, tokenizer):
                self.finish_reason = "stop"
            elif self.num_new >= self.req.max_new_tokens:
                self.finish_reason = "length"
            if self.finish_reason:
                return i + 1
        return len(new_tokens)

    def output(self, tokenizer) -> RequestOutput:
        out_ids = self.tokens[len(self.req.prompt_ids):]
        text = tokenizer.decode(out_ids, skip_special_tokens=True) if tokenizer else ""
        if self.finish_reason == "stop":
            cut = min((text.find(s) for s in self.req.stop if s in text), default=-1)
            text = text[:cut] if cut >= 0 else text
        return RequestOutput(self.req.prompt, list(self.req.prompt_ids), out_ids, text,
                             list(self.accept_lengths), self.finish_reason or "length")


def _ends_with_stop(row: Row, tokenizer) -> bool:
    # decode only a tail window: a stop string completed by the newest token lies within it
    longest = max(len(s) for s in row.req.stop)
    tail_ids = row.tokens[len(row.req.prompt_ids):][-(longest + 8):]
    tail = tokenizer.decode(tail_ids, skip_special_tokens=True)
    return any(s in tail for s in row.req.stop)
