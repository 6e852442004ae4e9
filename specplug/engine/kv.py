"""A batched KV cache over HF models where rolling back a token is flipping one bit.

Every forward appends a block of `q` slots to all rows.  Slots that hold rejected draft tokens,
padding, or tokens a row has since dropped stay in memory but are masked out of attention; their
positions are reused by the next tokens, so RoPE positions stay contiguous per row.  Trailing
slots that no row uses are cropped, and when holes pile up the cache is compacted.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache


class SlotCache:
    def __init__(self, batch: int, device: torch.device | str | None = None):
        # the target's: masks and bookkeeping live beside it (None: torch's default device)
        self.device = torch.device(device) if device is not None else torch.get_default_device()
        self.cache = DynamicCache()
        self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=self.device)  # [batch, slots]
        # [batch, slots] position each slot holds
        self.slot_pos = torch.zeros(batch, 0, dtype=torch.long, device=self.device)
        # [batch] committed tokens cached
        self.length = torch.zeros(batch, dtype=torch.long, device=self.device)
        self._block = 0

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    def forward(self, model, input_ids: torch.Tensor, positions: torch.Tensor, real: torch.Tensor,
                block_mask: torch.Tensor | None = None, output_hidden_states: bool = False):
        """Run `model` on a new block appended after the cached slots.

        input_ids, positions, real: [batch, q]; real marks non-padding inputs.
        block_mask: [batch, q, q] bool, which block inputs each input may see (a tree's ancestor
        matrix); None means causal.  The new slots start invalid: `commit` keeps what was accepted.
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
        out = model(input_ids=input_ids.clamp(min=0), position_ids=positions,
                    attention_mask=mask[:, None], past_key_values=self.cache, use_cache=True,
                    output_hidden_states=output_hidden_states)
        self.valid = torch.cat(
            [self.valid, torch.zeros(batch, q, dtype=torch.bool, device=self.device)], dim=1)
        self.slot_pos = torch.cat([self.slot_pos, positions], dim=1)
        self._block = q  # width of the block `commit` will pick from
        return out

    def commit(self, keep: list[list[int]]) -> None:
        """keep[r]: indices into the last block, in position order, that row r now holds."""
        start = self.valid.shape[1] - self._block
        for r, idx in enumerate(keep):
            if idx:
                cols = torch.tensor(idx, dtype=torch.long, device=self.device) + start
                self.valid[r, cols] = True
                self.length[r] += len(idx)
        self._trim()

    def truncate(self, row: int, length: int) -> None:
        """Drop row's cached tokens from position `length` on (rollback)."""
        self.valid[row] &= self.slot_pos[row] < length
        self.length[row] = self.length[row].clamp(max=length)

    def select_rows(self, rows: list[int]) -> None:
        if not rows:
            self.__init__(0, self.device)
            return
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        for layer in self.cache.layers:
            if getattr(layer, "is_initialized", False) and layer.keys.dim() == 4:
                layer.keys, layer.values = layer.keys[idx], layer.values[idx]
        self.valid, self.slot_pos, self.length = self.valid[idx], self.slot_pos[idx], self.length[idx]
        self._trim()

    def add_rows(self, n: int) -> None:
        """Append n empty rows (all slots invalid)."""
        if self.batch == 0:
            self.__init__(n, self.device)
            return
        for layer in self.cache.layers:
            if getattr(layer, "is_initialized", False) and layer.keys.dim() == 4:
                pad = layer.keys.new_zeros((n,) + tuple(layer.keys.shape[1:]))
                layer.keys = torch.cat([layer.keys, pad])
                layer.values = torch.cat([layer.values, pad.clone()])
        slots = self.valid.shape[1]
        new = dict(dtype=torch.long, device=self.device)
        self.valid = torch.cat([self.valid, torch.zeros(n, slots, dtype=torch.bool, device=self.device)])
        self.slot_pos = torch.cat([self.slot_pos, torch.zeros(n, slots, **new)])
        self.length = torch.cat([self.length, torch.zeros(n, **new)])

    def _trim(self) -> None:
        """Crop slots no row uses at the end; compact when over half the slots are holes."""
        used = self.valid.any(dim=0).nonzero()
        # the host decides how far to crop the cache: one sync per step
        keep_slots = int(used[-1]) + 1 if len(used) else 0
        drop = self.valid.shape[1] - keep_slots
        if drop > 0:
            self.cache.crop(-drop)
            self.valid, self.slot_pos = self.valid[:, :keep_slots], self.slot_pos[:, :keep_slots]
        if keep_slots > 64 and int(self.valid.sum(1).max()) * 2 < keep_slots:
            self._compact()

    def _compact(self) -> None:
        """Move each row's valid slots to the front (stable), dropping the holes."""
        width = int(self.valid.sum(1).max())
        # stable sort puts valid slots first in their original (position) order
        order = torch.sort((~self.valid).long(), dim=1, stable=True).indices[:, :width]
        for layer in self.cache.layers:
            if getattr(layer, "is_initialized", False) and layer.keys.dim() == 4:
                gather = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
                layer.keys = layer.keys.gather(2, gather)
                layer.values = layer.values.gather(2, gather)
        self.valid = self.valid.gather(1, order)
        self.slot_pos = self.slot_pos.gather(1, order)
