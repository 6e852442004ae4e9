"""Which request occupies which row of a drafter's batched cache.

Engines hand drafters a batch whose membership and order can change every step (rows finish,
new requests join).  A drafter's cache (anything with select_rows(list) and add_rows(n)) is kept
in the engine's order by `align`, so tensors line up with DraftInput rows.
"""
from __future__ import annotations


class RowSlots:
    def __init__(self, cache):
        self.cache = cache
        self.rows: list[int] = []  # request ids, in cache row order

    def drop(self, row_ids: list[int]) -> None:
        gone = set(row_ids)
        keep = [i for i, rid in enumerate(self.rows) if rid not in gone]
        if len(keep) < len(self.rows):
            self.cache.select_rows(keep)
            self.rows = [self.rows[i] for i in keep]

    def align(self, row_ids: list[int]) -> list[int]:
        """Make the cache hold exactly row_ids, in that order.  Returns the ids that are new
        (their rows start empty)."""
        wanted = set(row_ids)
        self.drop([rid for rid in self.rows if rid not in wanted])
        new = [rid for rid in row_ids if rid not in set(self.rows)]
        if new:
            self.cache.add_rows(len(new))
            self.rows += new
        index = {rid: i for i, rid in enumerate(self.rows)}
        order = [index[rid] for rid in row_ids]
        if order != list(range(len(row_ids))):
            self.cache.select_rows(order)
            self.rows = list(row_ids)
        return new


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix: how much of a cache survives new committed tokens."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
