"""The KV cache of an EAGLE-1/2/3 head: slots appended block by block, with a per-slot validity
mask, so a head's decoder layers (decoder_layer.py) can attend to committed entries, to their
own chain, or to a node's tree ancestors only."""
from __future__ import annotations

import torch


class HeadKV:
    """KV cache of a head's layers for a batch of rows, slots appended block by block.

    valid[r, s] marks the slots holding committed entries of row r; blocks appended while
    drafting stay invalid and are cropped when drafting ends, so rollback is a crop.
    """
    def __init__(self, num_layers: int, device: torch.device | str | None = None, batch: int = 0):
        self.num_layers = num_layers
        # the head's, and so the target's (None: torch's default device)
        self.device = torch.device(device) if device is not None else torch.get_default_device()
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # [b, kv_heads, slots, d]
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=self.device)  # [b, slots]
        # [b, slots] entry position
        self.pos = torch.zeros(batch, 0, dtype=torch.long, device=self.device)

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    @property
    def width(self) -> int:
        return self.valid.shape[1]

    def extend(self, positions: torch.Tensor) -> int:
        """Reserve a block of (invalid) slots; returns its first slot index.  positions [b, q]."""
        start = self.width
        self.valid = torch.cat([self.valid, torch.zeros_like(positions, dtype=torch.bool)], 1)
        self.pos = torch.cat([self.pos, positions], 1)
        return start

    def extend_for(self, layer: int):
        """The `extend` a DecoderLayer attends through: appends to this cache's `layer`."""
        return lambda k, v: self.append(layer, k, v)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """k, v [b, kv_heads, q, d] for the block just reserved; returns the full keys/values."""
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer] = k, v
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], 2)
            self.values[layer] = torch.cat([self.values[layer], v], 2)
        return self.keys[layer], self.values[layer]

    def truncate(self, row: int, length: int) -> None:
        """Forget row's entries at positions >= length."""
        self.valid[row] &= self.pos[row] < length

    def crop(self, width: int) -> None:
        self.valid, self.pos = self.valid[:, :width], self.pos[:, :width]
        for i in range(self.num_layers):
            if self.keys[i] is not None:
                self.keys[i] = self.keys[i][:, :, :width]
                self.values[i] = self.values[i][:, :, :width]
        used = self.valid.any(0).nonzero()
        # the host decides how far to crop: one sync per call
        last = int(used[-1]) + 1 if len(used) else 0
        if last < self.width:
            self.crop(last)
        elif self.width > 64 and int(self.valid.sum(1).max()) * 2 < self.width:
            self._compact()

    def select_rows(self, rows: list[int]) -> None:
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.valid, self.pos = self.valid[idx], self.pos[idx]
        for i in range(self.num_layers):
            if self.keys[i] is not None:
                self.keys[i], self.values[i] = self.keys[i][idx], self.values[i][idx]

    def add_rows(self, n: int) -> None:
        self.valid = torch.cat([self.valid, self.valid.new_zeros(n, self.width)])
        self.pos = torch.cat([self.pos, self.pos.new_zeros(n, self.width)])
        for i in range(self.num_layers):
            if self.keys[i] is not None:
                pad = self.keys[i].new_zeros((n,) + tuple(self.keys[i].shape[1:]))
                self.keys[i] = torch.cat([self.keys[i], pad])
                self.values[i] = torch.cat([self.values[i], pad.clone()])

    def _compact(self) -> None:
        """Move each row's valid slots to the front (stable), dropping holes."""
        width = int(self.valid.sum(1).max())
        order = torch.sort((~self.valid).long(), dim=1, stable=True).indices[:, :width]
        for i in range(self.num_layers):
            if self.keys[i] is not None:
                k = self.keys[i]
                idx = order[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
                self.keys[i] = k.gather(2, idx)
                self.values[i] = self.values[i].gather(2, idx)
        self.valid, self.pos = self.valid.gather(1, order), self.pos.gather(1, order)
