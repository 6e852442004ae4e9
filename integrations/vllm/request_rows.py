"""Stable specplug row ids for the requests in vLLM's batch rows.

vLLM's custom_class `propose` gets the batch by row index only (no request ids), and the runner
moves requests between rows: when one finishes, the last row is moved into the hole (condense),
and a new request reuses a free row.  Drafters keep per-row state (a draft model's KV cache, an
n-gram index) keyed by specplug row id; if row index i were the id, a request moved from row 7 to
row 2 would look like a new context to the drafter, which would rebuild its whole cache (a full
re-prefill of that request through the draft model).

`RequestRows.assign(contexts)` recognises a request by its committed tokens: a request's
committed tokens only grow, so the tokens seen for it last time are a prefix of what it has now.
A cheap fingerprint (length, first tokens, last token) is compared; a wrong match can only cost
speed, never a wrong draft, because drafters reconcile their state with the committed tokens on
every call.

    rows = RequestRows()
    rows.assign([[1, 2, 3], [7, 8]])         -> [0, 1]
    rows.assign([[7, 8, 9]])                  -> [1]      (request 1 moved into row 0)
    rows.assign([[7, 8, 9, 4], [5, 6]])       -> [1, 2]   (a new request in row 1)
"""
from __future__ import annotations

import numpy as np

HEAD = 8  # tokens compared at the start of a context


class RequestRows:
    def __init__(self):
        self._next_id = 0
        # specplug row id -> (committed length, first HEAD tokens, last token) when last seen
        self._seen: dict[int, tuple[int, tuple[int, ...], int]] = {}
        self._row_of: dict[int, int] = {}  # specplug row id -> vLLM row index last call
        self.forgotten: list[int] = []  # ids the last assign() dropped: release their state

    def assign(self, contexts: list[np.ndarray], rows: list[int] | None = None) -> list[int]:
        """contexts: committed tokens of the drafting rows (1-D int arrays); rows: their vLLM row
        indices (default 0..n-1).  Returns one specplug row id per context; ids not returned are
        forgotten (their requests left the batch or stopped drafting): see `forgotten`."""
        rows = list(range(len(contexts))) if rows is None else rows
        by_row = {r: rid for rid, r in self._row_of.items()}
        ids: list[int | None] = [None] * len(contexts)
        taken: set[int] = set()
        # 1. the request that sat in this row last call, if this context extends it
        for k, (row, ctx) in enumerate(zip(rows, contexts)):
            rid = by_row.get(row)
            if rid is not None and self._extends(rid, ctx):
                ids[k] = rid
                taken.add(rid)
        # 2. a request that moved here from another row
        for k, ctx in enumerate(contexts):
            if ids[k] is None:
                rid = next((r for r in self._seen if r not in taken and self._extends(r, ctx)), None)
                if rid is not None:
                    ids[k] = rid
                    taken.add(rid)
        # 3. a request the drafter has not seen
        for k in range(len(contexts)):
            if ids[k] is None:
                ids[k] = self._next_id
                self._next_id += 1
        self.forgotten = [rid for rid in self._seen if rid not in set(ids)]
        self._seen = {rid: _fingerprint(ctx) for rid, ctx in zip(ids, contexts)}
        self._row_of = dict(zip(ids, rows))
        return ids  # type: ignore[return-value]

    def _extends(self, rid: int, ctx: np.ndarray) -> bool:
        n, head, last = self._seen[rid]
        return (n > 0 and len(ctx) >= n and tuple(int(t) for t in ctx[:min(n, HEAD)]) == head
                and int(ctx[n - 1]) == last)


def _fingerprint(ctx: np.ndarray) -> tuple[int, tuple[int, ...], int]:
    n = len(ctx)
    return n, tuple(int(t) for t in ctx[:min(n, HEAD)]), int(ctx[n - 1]) if n else -1
