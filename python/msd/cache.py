"""A static K/V cache whose rows the msd kernels edit in place.

All layers' K and V live in one buffer ``[2 * layers, B, Hkv, S_max, D]`` (plane ``2l`` is
layer l's K, ``2l + 1`` its V), so one ``kv_compact`` call moves the accepted rows of every
layer. ``prefix_len`` (``[B]`` int32, on the device) counts the committed rows of each
sequence; sizes that change per step never leave the device. Rows are indexed by the plain
token index, whatever the model's positions are (M-RoPE coordinates never index the cache).
"""

from __future__ import annotations

import math

import torch

import msd_kernels


class StaticKVCache:
    """Preallocated K/V rows for ``num_layers`` layers of ``batch`` sequences.

    :meth:`write` puts a chunk of ``Q`` new rows at ``prefix_len + write_offset`` and
    returns the layer's whole K and V buffers; the attention reads what it may see from
    ``prefix_len`` and its mask. The engine then commits rows with :meth:`advance` or
    :meth:`compact`.
    """

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.kv = torch.zeros(2 * num_layers, batch, num_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.prefix_len = torch.zeros(batch, dtype=torch.int32, device=device)
        # Rows past prefix_len where the next chunk goes (the draft's tree levels stack up).
        self.write_offset = 0

    @classmethod
    def _view(cls, kv: torch.Tensor, prefix_len: torch.Tensor) -> StaticKVCache:
        cache = cls.__new__(cls)
        cache.kv, cache.prefix_len, cache.write_offset = kv, prefix_len, 0
        return cache

    @property
    def batch(self) -> int:
        return self.kv.shape[1]

    def row(self, index: int) -> StaticKVCache:
        """Sequence ``index`` alone: a cache of batch 1 whose rows and length are views of this
        one's (what is written through it lands here)."""
        return self._view(self.kv[:, index:index + 1], self.prefix_len[index:index + 1])

    def reset(self) -> None:
        """Forget every row (the buffers stay: a new generation reuses them)."""
        self.prefix_len.zero_()
        self.write_offset = 0

    @property
    def max_len(self) -> int:
        return self.kv.shape[3]

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``[B, Hkv, Q, D]`` new K/V rows of ``layer``; return its ``[B, Hkv, S_max, D]`` buffers."""
        batch, heads, num_new, head_dim = keys.shape
        rows = self.prefix_len.long().unsqueeze(1) + self.write_offset + torch.arange(num_new, device=self.kv.device)
        index = rows[:, None, :, None].expand(batch, heads, num_new, head_dim)
        key_buffer, value_buffer = self.kv[2 * layer], self.kv[2 * layer + 1]
        key_buffer.scatter_(2, index, keys.to(key_buffer.dtype))
        value_buffer.scatter_(2, index, values.to(value_buffer.dtype))
        return key_buffer, value_buffer

    def advance(self, num_rows: int | torch.Tensor) -> None:
        """Commit the rows just written: ``prefix_len += num_rows``."""
        self.prefix_len += num_rows

    def compact(self, accepted_index: torch.Tensor, num_accepted: torch.Tensor) -> None:
        """Keep the accepted tree rows (root first) and commit them (see ``kv_compact``)."""
        msd_kernels.kv_compact(self.kv, accepted_index, num_accepted, self.prefix_len)

    # A batch that loses sequences is packed into the start of the same storage rather than
    # copied to a new cache: no new memory, and the packed caches of each batch size are the
    # same tensors on every call (what a captured CUDA graph needs).
    def packed(self, batch: int) -> StaticKVCache:
        """The cache of ``batch`` <= :attr:`batch` sequences laid out contiguously, as the kernels
        take it (``[2 * layers, batch, Hkv, S_max, D]``), at the start of this cache's storage,
        with the first ``batch`` lengths. :meth:`repack` moves sequences into it."""
        if not 1 <= batch <= self.batch:
            raise ValueError(f"batch must be in [1, {self.batch}], got {batch}")
        if batch == self.batch:
            return self
        planes, _, heads, max_len, head_dim = self.kv.shape
        shape = (planes, batch, heads, max_len, head_dim)
        kv = self.kv.view(-1)[:math.prod(shape)].view(shape)
        return self._view(kv, self.prefix_len[:batch])

    def repack(self, batch: int, keep: list[int]) -> StaticKVCache:
        """Move sequences ``keep`` (ascending) of the packed cache of ``batch`` sequences to rows
        ``0 .. len(keep) - 1`` of the packed cache of ``len(keep)``, and return that cache.
        Destination blocks never lie after their source and every plane is moved before the
        next plane's sources are overwritten, so the moves can be made in place."""
        if list(keep) != sorted(set(keep)) or not keep or keep[-1] >= batch:
            raise ValueError(f"keep must be ascending distinct sequences of the {batch}, got {keep}")
        planes, rows = self.kv.shape[0], len(keep)
        blocks = self.kv.view(planes * self.batch, -1)  # one block per (plane, sequence)
        source = torch.tensor(keep, device=self.kv.device)
        for plane in range(planes):
            blocks[plane * rows:(plane + 1) * rows] = blocks[plane * batch + source]  # the gather copies first
        self.prefix_len[:rows] = self.prefix_len[source]
        return self.packed(rows)
