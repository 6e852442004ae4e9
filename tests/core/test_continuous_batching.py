"""Continuous batching in the embedded engine, and drafter rows the speculation budget skips.

- SlotCache.split_off / absorb move rows between caches without changing what any row attends.
- RowSlots parks a row missing from a call and brings it back as it was; only drop forgets it.
- The engine gives a finished row's place to the next request at once (fewer steps than static
  batches of the same size) and its greedy output stays the target's own.
- Every family keeps token identity when the budget skips different rows on different steps
  (before parking, a hidden-state drafter lost a skipped row's state and failed on its return).
"""
from __future__ import annotations

import torch

import test_engine_sampled_families as SF
from specplug.budget import SpeculationBudget
from specplug.drafters.row_slots import RowSlots
from specplug.engine.embedded import EmbeddedEngine
from specplug.engine.kv import SlotCache
from specplug.engine.rows import Request

HEADS, DIM, LAYERS = 2, 3, 2


def _cache(rows: int, lengths: list[int], seed: int) -> SlotCache:
    """rows with lengths[r] valid entries each (positions 0..n-1), random keys, 2 layers."""
    torch.manual_seed(seed)
    cache = SlotCache(rows, "cpu")
    width = max(lengths)
    pos, real = cache.ragged_block([0] * rows, lengths)
    kv = [(torch.randn(rows, HEADS, width, DIM), torch.randn(rows, HEADS, width, DIM))
          for _ in range(LAYERS)]
    cache.append(pos, kv, real)
    return cache


def _entries(cache: SlotCache, row: int) -> dict:
    """(layer, position) -> (key, value) of the entries `row` may attend."""
    out = {}
    for layer in range(LAYERS):
        lay = cache.cache.layers[layer]
        for s in range(cache.width):
            if cache.valid[row, s]:
                out[layer, int(cache.pos[row, s])] = (lay.keys[row, :, s].tolist(),
                                                      lay.values[row, :, s].tolist())
    return out


def test_split_off_and_absorb_keep_every_rows_entries():
    cache = _cache(4, [5, 2, 7, 3], seed=0)
    before = [_entries(cache, r) for r in range(4)]
    lengths = cache.length.tolist()
    moved = cache.split_off([2, 0])
    assert (cache.batch, moved.batch) == (2, 2)
    assert [_entries(moved, r) for r in range(2)] == [before[2], before[0]]
    assert [_entries(cache, r) for r in range(2)] == [before[1], before[3]]
    other = _cache(1, [9], seed=1)  # wider than either: the others are padded to it
    theirs = _entries(other, 0)
    cache.absorb(moved)
    cache.absorb(other)
    assert cache.batch == 5
    expected = [before[1], before[3], before[2], before[0], theirs]
    assert [_entries(cache, r) for r in range(5)] == expected
    assert cache.length.tolist() == [lengths[1], lengths[3], lengths[2], lengths[0], 9]
    empty = SlotCache(0, "cpu")
    empty.absorb(cache)
    assert empty.batch == 5 and [_entries(empty, r) for r in range(5)] == expected


def test_drop_rows_moves_the_last_rows_into_the_gaps_and_keeps_their_entries():
    cache = _cache(6, [5, 2, 7, 3, 4, 6], seed=3)
    before = [_entries(cache, r) for r in range(6)]
    lengths = cache.length.tolist()
    order = cache.drop_rows([1, 4, 0])
    # rows 3 and 5 (kept, past the new end of 3 rows) fill places 0 and 1; row 2 stays
    assert order == [3, 5, 2]
    assert cache.batch == 3
    assert [_entries(cache, r) for r in range(3)] == [before[i] for i in order]
    assert cache.length.tolist() == [lengths[i] for i in order]
    # the narrowed buffers still take new blocks for the rows that remain
    pos, real = cache.ragged_block([9, 9, 9], [1, 1, 1])
    cache.append(pos, [(torch.ones(3, HEADS, 1, DIM), torch.ones(3, HEADS, 1, DIM))] * LAYERS,
                 real)
    assert all(_entries(cache, r)[0, 9] == ([[1.0] * DIM] * HEADS,) * 2 for r in range(3))
    assert cache.drop_rows([0, 1, 2]) == [] and cache.batch == 0


def test_rows_filled_inside_inference_mode_drop_outside_it():
    """An engine may fill a drafter's cache inside inference mode and retire a row from outside
    it (SGLang calls note_request_finished so): the in-place moves must still be allowed."""
    with torch.inference_mode():
        cache = _cache(4, [2, 3, 1, 2], seed=5)
    last = _entries(cache, 3)
    assert cache.drop_rows([0]) == [3, 1, 2]
    assert _entries(cache, 0) == last


def test_row_slots_park_absent_rows_and_bring_them_back():
    slots = RowSlots(_cache(3, [2, 4, 3], seed=2))
    slots.rows = [10, 11, 12]  # as align([10, 11, 12]) and a first forward would leave them
    state = {rid: _entries(slots.cache, r) for r, rid in enumerate(slots.rows)}

    assert slots.align([11]) == []  # 10 and 12 parked
    assert slots.rows == [11] and sorted(slots.parked_rows) == [10, 12]
    assert _entries(slots.cache, 0) == state[11]
    assert slots.align([12, 13, 10]) == [13]  # back as they were; 13 is new and empty
    assert slots.rows == [12, 13, 10]
    assert _entries(slots.cache, 0) == state[12] and _entries(slots.cache, 2) == state[10]
    assert _entries(slots.cache, 1) == {}
    slots.drop([11])  # a released row is gone, parked or not
    assert slots.parked_rows == [] and slots.align([11]) == [11]


def test_a_finished_rows_place_goes_to_the_next_request():
    target, tok, prompt = SF._tiny_text_target()
    # one short request, then long ones: static batches of 2 would wait for the long row
    reqs = [Request(list(prompt), n) for n in (2, 12, 12, 3, 12)]
    alone, _ = EmbeddedEngine(target, None, None).generate(reqs, batch_size=1)
    engine = EmbeddedEngine(target, None, None)
    steps = []
    step = engine.step
    engine.step = lambda active, *a, **k: steps.append(len(active)) or step(active, *a, **k)
    together, stats = engine.generate(reqs, batch_size=2)
    assert [o.output_token_ids for o in together] == [o.output_token_ids for o in alone]
    assert stats.num_steps == len(steps)  # one per target forward over the batch
    # static: batches (2, 12), (12, 3), (12) take 11 + 11 + 11 steps after their prefills
    assert len(steps) < 33 and max(steps) == 2, steps
    assert steps.count(2) > len(steps) // 2  # the batch stayed full while requests waited


class _Alternating(SpeculationBudget):
    """A budget that drafts for every other row, the odd rows on odd steps: each row is skipped
    every second step, so its drafter state must survive a step without it."""

    def __init__(self, max_tokens: int):
        super().__init__(max_tokens)
        self.steps = 0

    def plan(self, row_ids, recut=False, backlog=None):
        self.steps += 1
        return [self.max_tokens if (i + self.steps) % 2 else 0 for i in range(len(row_ids))]

    def limits_before_scoring(self, row_ids, backlog=None):
        return self.plan(row_ids)


def test_every_family_keeps_greedy_identity_when_rows_are_skipped(tmp_path):
    for family in SF.FAMILIES:
        target, drafter, prompt = family(str(tmp_path / family.__name__))
        reqs = [Request(list(prompt) + [t], 10) for t in (3, 5, 7, 9)]
        plain, _ = EmbeddedEngine(target, None, None).generate(reqs, batch_size=3)
        spec, stats = EmbeddedEngine(target, None, drafter, SF.GAMMA,
                                     budget=_Alternating(SF.GAMMA)).generate(reqs, batch_size=3)
        assert [o.output_token_ids for o in spec] == [o.output_token_ids for o in plain], \
            family.__name__
        assert stats.num_draft_tokens > 0, family.__name__


def test_prompts_admitted_together_are_prefilled_one_by_one():
    """No padded block of prompts: each admitted prompt runs alone, so admitting requests
    together costs what admitting them one at a time does."""
    target, tok, prompt = SF._tiny_text_target()
    reqs = [Request(list(prompt)[:n], 4) for n in (3, 9, 5)]
    engine = EmbeddedEngine(target, None, None)
    sizes = []
    prefill = engine.prefill
    engine.prefill = lambda rows, cache: sizes.append(len(rows)) or prefill(rows, cache)
    together, _ = engine.generate(reqs, batch_size=3)
    alone, _ = EmbeddedEngine(target, None, None).generate(reqs, batch_size=1)
    assert sizes == [1, 1, 1]
    assert [o.output_token_ids for o in together] == [o.output_token_ids for o in alone]


def test_a_run_leaves_the_heap_it_found_out_of_full_collections():
    """What lives when generate starts (the model, the drafter) outlives the run: it is frozen,
    so Python's full collections do not walk it again on every step (each walk of a heap with
    torch and transformers took ~200 ms at batch 32)."""
    import gc
    target, _, prompt = SF._tiny_text_target()
    gc.unfreeze()
    try:
        assert any(o is target for o in gc.get_objects())  # tracked: each full pass walks it
        EmbeddedEngine(target, None, None).generate([Request(list(prompt), 2)])
        assert gc.get_freeze_count() > 0
        assert not any(o is target for o in gc.get_objects())
    finally:
        gc.unfreeze()
