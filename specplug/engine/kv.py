"""The one KV cache of specplug: batched, position-indexed, where rolling back a token is
flipping one bit.

It serves the embedded engine's target, the draft model (HF models: `forward` hands them the
transformers `Cache` inside, made of GrowingLayers), and every drafter with its own decoder
layers (EAGLE heads, DFlash, SpecDiff: `extend_for(layer)` is the `extend` those layers attend
through).

Every block appends `q` slots to all rows (`reserve`).  Slots that hold rejected drafts, padding,
or tokens a row has since dropped stay in memory but are masked out of attention: `valid[r, s]`
says whether row r may attend slot s, `pos[r, s]` is the position the slot holds.  A row's
positions are reused by its next tokens, so RoPE positions stay contiguous per row.  Trailing
slots that no row uses are cropped, and when holes pile up the cache is compacted.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class GrowingLayer(DynamicLayer):
    """One layer's keys/values in a buffer with spare room at the end.  Appending a block writes
    it in place, O(block); the buffer doubles when full, so a token costs O(1) copies amortised,
    where DynamicLayer's torch.cat copies the layer's whole cache on every step.  Cropping (a
    finished draft) moves the end back.  `keys`/`values` read the used part, and assigning them
    (row selection, compaction) replaces the buffer."""

    _keys = _values = None
    used = 0  # slots in use

    @property
    def keys(self):
        return None if self._keys is None else self._keys[:, :, :self.used]

    @keys.setter
    def keys(self, value):  # [b, kv_heads, slots, head_dim]
        self._keys = value
        self.used = 0 if value is None else value.shape[2]

    @property
    def values(self):
        return None if self._values is None else self._values[:, :, :self.used]

    @values.setter
    def values(self, value):  # after `keys`, with as many slots
        self._values = value

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """key_states, value_states [b, kv_heads, q, head_dim] -> all keys, values."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.used + key_states.shape[2]
        if not self._writable(key_states):
            # autograd (training) or an inference tensor outside inference mode: no writes in
            # place, a new tensor as DynamicLayer makes
            keys = torch.cat([self.keys, key_states], 2)
            values = torch.cat([self.values, value_states], 2)
            self.keys, self.values = keys, values
            return keys, values
        if end > self._keys.shape[2]:
            self._grow(max(end, 2 * self._keys.shape[2], 16))
        self._keys[:, :, self.used:end] = key_states
        self._values[:, :, self.used:end] = value_states
        self.used = end
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        """tokens_to_remove < 0: drop that many slots from the end (DynamicLayer's convention)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count, got {tokens_to_remove}")
        self.used = max(self.used + tokens_to_remove, 0)

    def _writable(self, block: torch.Tensor) -> bool:
        if block.requires_grad or self._keys.requires_grad:
            return False
        return not self._keys.is_inference() or torch.is_inference_mode_enabled()

    def _grow(self, capacity: int) -> None:
        b, heads, _, dim = self._keys.shape
        keys = self._keys.new_empty(b, heads, capacity, dim)
        values = self._values.new_empty(b, heads, capacity, dim)
        keys[:, :, :self.used], values[:, :, :self.used] = self.keys, self.values
        self._keys, self._values = keys, values


class SlotCache:
    def __init__(self, batch: int = 0, device: torch.device | str | None = None):
        # the target's: keys, masks and bookkeeping live beside it (None: torch's default device)
        self.device = torch.device(device) if device is not None else torch.get_default_device()
        # per layer keys/values [batch, kv_heads, slots, head_dim]; an HF model takes it as
        # past_key_values like the DynamicCache it would make itself
        self.cache = Cache(layer_class_to_replicate=GrowingLayer)
        self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=self.device)  # [batch, slots]
        # [batch, slots] position each slot holds
        self.pos = torch.zeros(batch, 0, dtype=torch.long, device=self.device)
        # [batch] tokens kept (`keep`) and not rolled back since
        self.length = torch.zeros(batch, dtype=torch.long, device=self.device)
        self._block = 0  # width of the last reserved block: what `keep` picks from

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    @property
    def width(self) -> int:
        return self.valid.shape[1]

    # -- appending ----------------------------------------------------------------------------
    def reserve(self, positions: torch.Tensor) -> int:
        """Append a block of (invalid) slots at positions [batch, q]; returns its first slot."""
        start = self.width
        self.valid = torch.cat([self.valid, torch.zeros_like(positions, dtype=torch.bool)], 1)
        self.pos = torch.cat([self.pos, positions], 1)
        self._block = positions.shape[1]
        return start

    def ragged_block(self, first: list[int], counts: list[int]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Host lists -> (positions [batch, w], real [batch, w]) on the cache's device, w =
        max(counts): row r's entries sit at first[r], first[r] + 1, ..., counts[r] of them real.
        Laid out on the host and copied over once."""
        steps = torch.arange(max(counts), device="cpu")
        pos = torch.tensor(first, dtype=torch.long, device="cpu")[:, None] + steps
        real = steps[None, :] < torch.tensor(counts, device="cpu")[:, None]
        return pos.to(self.device), real.to(self.device)

    def append(self, positions: torch.Tensor, kv: list, real: torch.Tensor) -> None:
        """Append finished entries: positions, real [batch, q]; kv per layer (k, v)
        [batch, kv_heads, q, head_dim].  Rows keep their `real` slots."""
        self.reserve(positions)
        for layer, (k, v) in enumerate(kv):
            self.cache.update(k, v, layer)
        self.keep(real)

    def extend_for(self, layer: int):
        """The `extend(k, v)` a decoder layer attends through: appends the reserved block's
        k, v [batch, kv_heads, q, head_dim] to `layer` and returns all its keys and values."""
        return lambda k, v: self.cache.update(k, v, layer)

    def forward(self, model, input_ids: torch.Tensor, positions: torch.Tensor, real: torch.Tensor,
                block_mask: torch.Tensor | None = None, output_hidden_states: bool = False,
                logits_to_keep: int = 0):
        """Run the HF `model` on a new block appended after the cached slots.

        input_ids, positions, real: [batch, q]; real marks non-padding inputs.
        block_mask: [batch, q, q] bool, which block inputs each input may see (a tree's ancestor
        matrix); None means causal.  The new slots start invalid: `commit` keeps what was accepted.
        logits_to_keep: logits for the block's last n inputs only (0: all), as HF's argument.
        """
        batch, q = input_ids.shape
        if block_mask is None:
            block_mask = torch.ones(q, q, dtype=torch.bool, device=self.device).tril()
            block_mask = block_mask.expand(batch, q, q)
        block_mask = block_mask & real[:, None, :]
        # padding rows see themselves: no NaN
        block_mask = block_mask | torch.eye(q, dtype=torch.bool, device=self.device)
        allowed = torch.cat([self.valid[:, None, :].expand(batch, q, -1), block_mask], dim=2)
        dtype = model.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=self.device)
        mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)
        self.reserve(positions)
        return model(input_ids=input_ids.clamp(min=0), position_ids=positions,
                     attention_mask=mask[:, None], past_key_values=self.cache, use_cache=True,
                     output_hidden_states=output_hidden_states, logits_to_keep=logits_to_keep)

    # -- keeping and dropping -----------------------------------------------------------------
    def keep(self, mask: torch.Tensor) -> None:
        """mask [batch, q] bool over the last reserved block: the slots rows now hold."""
        start = self.width - self._block
        self.valid[:, start:] |= mask
        self.length += mask.sum(1)

    def commit(self, keep: list[list[int]]) -> None:
        """keep[r]: indices into the last block, in position order, that row r now holds."""
        # host lists (what verification accepted): one bool block built there, copied once
        mask = torch.zeros(self.batch, self._block, dtype=torch.bool, device="cpu")
        for r, idx in enumerate(keep):
            mask[r, idx] = True
        self.keep(mask.to(self.device))
        self._trim()

    def truncate(self, row: int, length: int) -> None:
        """Drop row's cached entries from position `length` on (rollback)."""
        self.valid[row] &= self.pos[row] < length
        self.length[row] = self.length[row].clamp(max=length)

    def crop(self, width: int) -> None:
        """Forget every slot from `width` on (a finished draft), then trim."""
        drop = self.width - width
        if drop > 0:
            self.cache.crop(-drop)
            self.valid, self.pos = self.valid[:, :width], self.pos[:, :width]
        self._block = 0
        self._trim()

    # -- rows ---------------------------------------------------------------------------------
    def select_rows(self, rows: list[int]) -> None:
        """Keep rows `rows`, in that order (RowSlots aligns the cache with an engine's batch)."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        for layer in self._layers():
            layer.keys, layer.values = layer.keys[idx], layer.values[idx]
        self.valid, self.pos, self.length = self.valid[idx], self.pos[idx], self.length[idx]
        self._trim()

    def drop_rows(self, rows: list[int]) -> list[int]:
        """Forget rows `rows`: the last rows kept move into the places of dropped ones (one
        row's entries copied each) and the batch is cut short as a view, where select_rows
        copied every kept row.  Returns the old index of each row kept, in the new order.

        Why: in a batch's last wave, speculative rows finish on different steps, and each
        select_rows copied the whole cache (MT-Bench at batch 32, bf16, 32 new tokens: the
        speculative arms' prefill phase took 0.7-1.1 s longer than plain decoding's)."""
        gone = set(rows)
        kept = self.batch - len(gone)
        holes = [i for i in sorted(gone) if i < kept]  # places to fill
        movers = [i for i in range(kept, self.batch) if i not in gone]  # rows past the new end
        order = list(range(kept))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        if holes:
            dst = torch.tensor(holes, dtype=torch.long, device=self.device)
            src = torch.tensor(movers, dtype=torch.long, device=self.device)
            # in place, so inside inference mode: an engine may fill a drafter's cache inside
            # it and retire a row from outside (SGLang's note_request_finished does)
            with torch.inference_mode():
                for layer in self._layers():
                    used = layer.used
                    layer._keys[dst, :, :used] = layer._keys[src, :, :used]
                    layer._values[dst, :, :used] = layer._values[src, :, :used]
                for name in ("valid", "pos", "length"):
                    getattr(self, name)[dst] = getattr(self, name)[src]
        for layer in self._layers():
            layer._keys, layer._values = layer._keys[:kept], layer._values[:kept]
        self.valid, self.pos, self.length = self.valid[:kept], self.pos[:kept], self.length[:kept]
        self._trim()
        return order

    def add_rows(self, n: int) -> None:
        """Append n empty rows (all slots invalid)."""
        for layer in self._layers():
            pad = layer.keys.new_zeros((n,) + tuple(layer.keys.shape[1:]))
            layer.keys, layer.values = torch.cat([layer.keys, pad]), torch.cat([layer.values, pad])
        self.valid = torch.cat([self.valid, self.valid.new_zeros(n, self.width)])
        self.pos = torch.cat([self.pos, self.pos.new_zeros(n, self.width)])
        self.length = torch.cat([self.length, self.length.new_zeros(n)])

    def absorb(self, others: "SlotCache | list[SlotCache]") -> None:
        """Append the rows of `others` (one cache or several, in order) after these
        (continuous batching: newly prefilled requests join a running batch).  Narrower caches
        are padded with invalid slots.  Every layer is copied once into a buffer with as many
        spare slots as it holds, as GrowingLayer's doubling would leave.

        Why one copy with room: joining 32 prefilled prompts one at a time copied the growing
        cache 32 times, and a buffer that is exactly full makes the next step's append copy
        it again (SmolLM2 at batch 32, bf16: the first step after admitting a batch took 217 ms
        against 120 ms, and the budget read that as what plain steps cost)."""
        parts = [c for c in ([self] + list(others if isinstance(others, list) else [others]))
                 if c.batch > 0]
        if not parts:
            return
        depths = {len(c._layers()) for c in parts}
        if len(depths) > 1:
            raise ValueError(f"caches of {sorted(depths)} layers cannot be joined")
        width = max(c.width for c in parts)
        layers = []
        for stacked in zip(*[c._layers() for c in parts]):
            first = stacked[0].keys
            batch = sum(layer.keys.shape[0] for layer in stacked)
            shape = (batch, first.shape[1], 2 * width, first.shape[3])
            # zeros: padding slots are masked, and a masked NaN would still poison attention
            keys, values = first.new_zeros(shape), first.new_zeros(shape)
            row = 0
            for layer in stacked:
                n, used = layer.keys.shape[0], layer.used
                keys[row:row + n, :, :used] = layer.keys
                values[row:row + n, :, :used] = layer.values
                row += n
            joined = GrowingLayer()
            joined.lazy_initialization(first, stacked[0].values)
            joined._keys, joined._values, joined.used = keys, values, width
            layers.append(joined)
        self.cache = Cache(layer_class_to_replicate=GrowingLayer)
        self.cache.layers.extend(layers)
        for name in ("valid", "pos"):
            setattr(self, name, torch.cat([_pad_slots(getattr(c, name), width, 1) for c in parts]))
        self.length = torch.cat([c.length for c in parts])
        self._block = 0

    def replace_rows(self, rows: list[int], other: "SlotCache", other_rows: list[int]) -> None:
        """Overwrite rows `rows` with other's rows `other_rows` (same order), in place: the cost
        is those rows' entries, where dropping rows and appending others copied every row.  A
        wider `other` first widens this cache with invalid slots."""
        if not rows:
            return
        if other.width > self.width:
            extra = other.width - self.width
            kv = [(layer.keys.new_zeros(layer.keys.shape[:2] + (extra,) + layer.keys.shape[3:]),)
                  * 2 for layer in self._layers()]
            self.append(self.pos.new_zeros(self.batch, extra), kv,
                        self.valid.new_zeros(self.batch, extra))
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        src = torch.tensor(other_rows, dtype=torch.long, device=self.device)
        width = other.width
        for mine, theirs in zip(self._layers(), other._layers()):
            # the old rows' slots past `width` stay as they were: written once, masked from now
            mine.keys[idx, :, :width] = theirs.keys[src]
            mine.values[idx, :, :width] = theirs.values[src]
        self.valid[idx] = _pad_slots(other.valid[src], self.width, 1)
        self.pos[idx] = _pad_slots(other.pos[src], self.width, 1)
        self.length[idx] = other.length[src]

    def split_off(self, rows: list[int]) -> "SlotCache":
        """Move `rows` out, in that order, into a cache of their own; this one keeps the rest
        (a drafter parks the rows the speculation budget skips: see RowSlots)."""
        out = SlotCache(0, self.device)
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        for layer in self._layers():
            moved = GrowingLayer()
            moved.lazy_initialization(layer.keys[idx], layer.values[idx])
            moved.keys, moved.values = layer.keys[idx], layer.values[idx]
            out.cache.layers.append(moved)
        out.valid, out.pos, out.length = self.valid[idx], self.pos[idx], self.length[idx]
        out._trim()
        gone = set(rows)
        self.select_rows([i for i in range(self.batch) if i not in gone])
        return out

    def gather_rows(self, rows: torch.Tensor | None = None):
        """rows [m] cache rows, repeats allowed -> per layer (k, v) [m, kv_heads, slots, hd] and
        valid [m, slots]: a read-only copy for callers that score several blocks per row.
        rows None: every row as it is, without a copy."""
        if rows is None:
            return [(layer.keys, layer.values) for layer in self._layers()], self.valid
        kv = [(layer.keys[rows], layer.values[rows]) for layer in self._layers()]
        return kv, self.valid[rows]

    # -- housekeeping -------------------------------------------------------------------------
    def _layers(self):
        return [layer for layer in self.cache.layers
                if getattr(layer, "is_initialized", False) and layer.keys.dim() == 4]

    def _trim(self) -> None:
        """Crop slots no row uses at the end; compact when over half the slots are holes."""
        used = self.valid.any(dim=0).nonzero()
        # the host decides how far to crop the cache: one sync per call
        keep_slots = int(used[-1]) + 1 if len(used) else 0
        drop = self.width - keep_slots
        if drop > 0:
            self.cache.crop(-drop)
            self.valid, self.pos = self.valid[:, :keep_slots], self.pos[:, :keep_slots]
        if keep_slots > 64 and int(self.valid.sum(1).max()) * 2 < keep_slots:
            self._compact()

    def _compact(self) -> None:
        """Move each row's valid slots to the front (stable), dropping the holes."""
        width = int(self.valid.sum(1).max())
        # stable sort puts valid slots first in their original (position) order
        order = torch.sort((~self.valid).long(), dim=1, stable=True).indices[:, :width]
        for layer in self._layers():
            heads, head_dim = layer.keys.shape[1], layer.keys.shape[3]
            gather = order[:, None, :, None].expand(-1, heads, -1, head_dim)
            # both read before either is replaced: `values` reads as many slots as `keys` holds
            layer.keys, layer.values = layer.keys.gather(2, gather), layer.values.gather(2, gather)
        self.valid = self.valid.gather(1, order)
        self.pos = self.pos.gather(1, order)


def _pad_slots(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """t with zeros appended along its slot dimension `dim` up to `width` slots (keys/values
    [b, kv_heads, slots, head_dim]: dim 2; valid/pos [b, slots]: dim 1)."""
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim)
