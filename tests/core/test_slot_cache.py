"""The one KV cache (specplug.engine.kv.SlotCache) against a plain per-row reference: after any
sequence of blocks, keeps, rollbacks, crops and row changes, each row attends to exactly the
(position, key) entries the reference holds, whatever holes and compactions happened inside."""
import random

import pytest
import torch

from specplug.engine.kv import SlotCache

LAYERS, HEADS, DIM = 2, 1, 3


def _visible(cache: SlotCache, row: int) -> dict[int, list[float]]:
    """position -> layer-0 key of the slots row may attend."""
    keys = cache.cache.layers[0].keys[row, 0] if cache.width else None
    return {int(p): keys[s].tolist() for s, p in enumerate(cache.pos[row]) if cache.valid[row, s]}


def _block(cache: SlotCache, ref: list[dict], rng: random.Random, drafted: bool):
    """Append a block of random width; keep a random prefix of it per row unless `drafted`."""
    q = rng.randint(1, 4)
    nxt = [max(r, default=-1) + 1 for r in ref]  # each row's next position
    pos = torch.tensor([[n + i for i in range(q)] for n in nxt], dtype=torch.long).view(len(ref), q)
    cache.reserve(pos)
    k = torch.randn(cache.batch, HEADS, q, DIM)
    for layer in range(LAYERS):
        keys, _ = cache.extend_for(layer)(k + layer, k)
        assert keys.shape[2] == cache.width
    if drafted:
        return
    keep = [rng.randint(0, q) for _ in ref]
    mask = torch.tensor([[i < n for i in range(q)] for n in keep], dtype=torch.bool)
    mask = mask.view(len(ref), q)
    cache.keep(mask)
    for r, n in enumerate(keep):
        for i in range(n):
            ref[r][nxt[r] + i] = k[r, 0, i].tolist()


@pytest.mark.parametrize("seed", range(6))
def test_slot_cache_matches_reference(seed):
    rng, cache, ref = random.Random(seed), SlotCache(2, "cpu"), [{}, {}]
    torch.manual_seed(seed)
    for _ in range(120):
        op = rng.random()
        if op < 0.45:
            _block(cache, ref, rng, drafted=False)
        elif op < 0.6:  # a draft block, then forgotten
            width = cache.width
            _block(cache, ref, rng, drafted=True)
            cache.crop(width)
        elif op < 0.75 and cache.batch:
            r = rng.randrange(cache.batch)
            length = rng.randint(0, len(ref[r]))
            cache.truncate(r, length)
            ref[r] = {p: k for p, k in ref[r].items() if p < length}
        elif op < 0.85 and cache.batch:
            order = rng.sample(range(cache.batch), rng.randint(0, cache.batch))
            cache.select_rows(order)
            ref = [ref[i] for i in order]
        elif op < 0.93 or (cache.batch and not cache._layers()):  # absorb needs layers
            n = rng.randint(1, 2)
            cache.add_rows(n)
            ref += [{} for _ in range(n)]
        else:  # rows prefilled on their own join, or take finished rows' places
            other = SlotCache(rng.randint(1, 2), "cpu")
            other_ref = [{} for _ in range(other.batch)]
            for _ in range(rng.randint(1, 3)):
                _block(other, other_ref, rng, drafted=False)
            if rng.random() < 0.5 or not cache.batch:
                cache.absorb(other)
                ref += other_ref
            else:
                places = rng.sample(range(cache.batch), min(other.batch, cache.batch))
                cache.replace_rows(places, other, list(range(len(places))))
                for place, r in zip(places, other_ref):
                    ref[place] = r
        assert cache.batch == len(ref)
        assert cache.length.tolist() == [len(r) for r in ref]
        for r in range(cache.batch):
            assert _visible(cache, r) == ref[r]
    cache.crop(cache.width)  # a finished draft that added nothing: the cache trims itself
    assert cache.width <= 64 or int(cache.valid.sum(1).max()) * 2 >= cache.width
    for r in range(cache.batch):
        assert _visible(cache, r) == ref[r]


def test_gather_rows_repeats_rows():
    cache = SlotCache(2, "cpu")
    cache.reserve(torch.tensor([[0, 1], [0, 1]]))
    k = torch.arange(2 * HEADS * 2 * DIM, dtype=torch.float).view(2, HEADS, 2, DIM)
    cache.extend_for(0)(k, k)
    cache.keep(torch.tensor([[True, True], [True, False]]))
    kv, valid = cache.gather_rows(torch.tensor([1, 1, 0]))
    assert torch.equal(kv[0][0], k[[1, 1, 0]])
    assert valid.tolist() == [[True, False], [True, False], [True, True]]
    # no rows named: the cache's own tensors, not a copy
    kv, valid = cache.gather_rows()
    assert kv[0][0].data_ptr() == cache.cache.layers[0].keys.data_ptr()
    assert valid is cache.valid


def test_append_a_ragged_block():
    cache = SlotCache(2, "cpu")
    pos, real = cache.ragged_block([4, 0], [1, 3])
    assert pos.tolist() == [[4, 5, 6], [0, 1, 2]]
    assert real.tolist() == [[True, False, False], [True, True, True]]
    k = torch.randn(2, HEADS, 3, DIM)
    cache.append(pos, [(k, k)], real)
    assert cache.length.tolist() == [1, 3]
    assert _visible(cache, 0) == {4: k[0, 0, 0].tolist()}

