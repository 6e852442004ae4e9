"""Which request occupies which row of a drafter's batched cache, and how much of a row's cached
state survives the tokens committed since its last call.

Engines hand drafters a batch whose membership and order can change every step (rows finish,
new requests join, the speculation budget skips rows for a step).  A drafter's SlotCache is kept
in the engine's order by `align`, so tensors line up with DraftInput rows.  A row missing from
a call is parked, not dropped: the budget may skip it for a few steps and it then resumes from its
state.  Only `drop` (the engine's `release`, a request that left) forgets a row.
"""
from __future__ import annotations

import torch


class RowSlots:
    def __init__(self, cache):
        self.cache = cache  # a SlotCache: the rows this call drafts for
        self.rows: list[int] = []  # request ids, in cache row order
        self.parked = None  # a SlotCache of rows absent from the last call, once there were any
        self.parked_rows: list[int] = []

    def drop(self, row_ids: list[int]) -> None:
        gone = set(row_ids)
        dropped = [i for i, rid in enumerate(self.rows) if rid in gone]
        if dropped:
            # the engine drops its finished rows the same way (SlotCache.drop_rows), so the
            # next align finds the rows already in the engine's order: nothing more is copied
            self.rows = [self.rows[i] for i in self.cache.drop_rows(dropped)]
        keep = [i for i, rid in enumerate(self.parked_rows) if rid not in gone]
        if len(keep) < len(self.parked_rows):
            self.parked.select_rows(keep)
            self.parked_rows = [self.parked_rows[i] for i in keep]

    def align(self, row_ids: list[int]) -> list[int]:
        """Make the cache hold exactly row_ids, in that order: absent rows are parked, parked
        rows come back.  Returns the ids that are new (their rows start empty)."""
        wanted = set(row_ids)
        absent = [i for i, rid in enumerate(self.rows) if rid not in wanted]
        if absent:
            self._park(absent)
        back = [rid for rid in row_ids if rid in set(self.parked_rows)]
        if back:
            self._unpark(back)
        held = set(self.rows)
        new = [rid for rid in row_ids if rid not in held]
        if new:
            self.cache.add_rows(len(new))
            self.rows += new
        index = {rid: i for i, rid in enumerate(self.rows)}
        order = [index[rid] for rid in row_ids]
        if order != list(range(len(row_ids))):
            self.cache.select_rows(order)
            self.rows = list(row_ids)
        return new

    def _park(self, index: list[int]) -> None:
        """Move cache rows `index` to the parked cache."""
        moved = self.cache.split_off(index)
        self.parked_rows += [self.rows[i] for i in index]
        gone = set(index)
        self.rows = [rid for i, rid in enumerate(self.rows) if i not in gone]
        if self.parked is None:
            self.parked = moved
        else:
            self.parked.absorb(moved)

    def _unpark(self, row_ids: list[int]) -> None:
        """Move parked rows `row_ids` back, after the cache's rows."""
        where = {rid: i for i, rid in enumerate(self.parked_rows)}
        self.cache.absorb(self.parked.split_off([where[rid] for rid in row_ids]))
        returning = set(row_ids)
        self.parked_rows = [rid for rid in self.parked_rows if rid not in returning]
        self.rows += row_ids


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix: how much of a cache survives new committed tokens."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def surviving_prefix(have: list[int], ids: torch.Tensor, num_new: int | None) -> tuple[int, list[int]]:
    """have: the tokens a row's drafter state was built from, in order (committed ones, then
    maybe its own drafts); ids [n]: the row's committed tokens (CPU); num_new: tokens committed
    since the row's last call (DraftInput.num_new_committed), or None.

    Returns (k, ids[k:] as a list): have[:k] is still a prefix of the committed tokens, and the
    state needs ids[k:] fed.  Committed tokens never change, so with num_new only the tail from
    n - num_new is compared and copied to the host: O(new + drafted), not O(context).  Without
    it, or when it does not fit what the row held (then the engine's count is not trusted), the
    whole context is compared."""
    n = int(ids.shape[0])
    start = n - num_new if num_new is not None else -1
    # the state was built from committed tokens (and maybe drafts after them) at its last
    # call, when `start` were committed: a prefix of those is still valid as it is, and its last
    # token must still be there (one element read, the guard against a miscounting engine)
    held = min(start, len(have))
    fits = start >= 0 and (held == 0 or have[held - 1] == int(ids[held - 1]))
    if not fits:
        ctx = ids.tolist()
        k = common_prefix(have, ctx)
        return k, ctx[k:]
    tail = ids[held:].tolist()  # the new tokens, and any committed ones the state lacks
    k = held + common_prefix(have[held:], tail)
    return k, tail[k - held:]
