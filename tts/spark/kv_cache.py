"""A static key/value cache: one preallocated slab per layer, one row ("slot") per running sequence.

k, v: [n_layers, max_batch + SPARE_SLOTS, n_kv_heads, max_seq_len + SPARE_POSITIONS, head_dim]. A sequence owns
one slot from its prefill until it finishes; positions past its length hold stale values that the
attention mask hides, so a slot is reused without clearing.
"""

from __future__ import annotations

import torch
from torch import nn


#: Positions allocated past max_seq_len, never part of a sequence. Three uses: the graphed decode
#: step's warm-up runs write their keys there (`scratch_position` on); a replay of several steps
#: (`tts.spark.fast_step.fused_steps`, at most this many) may run steps past a sequence's last
#: position before the host sees it finish, and their writes land there; and a key-length bucket
#: is always shorter than the slab, so the compiled step sees one layout for every bucket (a slice
#: that spans a whole axis is the axis itself, and the compiler specialised on that: a recompile).
SPARE_POSITIONS = 8
#: Slots allocated past max_batch, never given to a sequence: for the same reason a row-count
#: bucket is then always fewer rows than the slab has (measured on the CPU: with rows equal to
#: the slot count the compiled step fixed the row count to that constant). ~12 MB per 1000
#: positions for the 0.5B Spark LLM in bf16.
SPARE_SLOTS = 1


class StaticKVCache(nn.Module):
    def __init__(self, n_layers: int, max_batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        super().__init__()
        shape = (n_layers, max_batch + SPARE_SLOTS, n_kv_heads, max_seq_len + SPARE_POSITIONS, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_batch(self) -> int:
        """Slots sequences may use (the slab holds SPARE_SLOTS more)."""
        return self.k.shape[1] - SPARE_SLOTS

    @property
    def max_seq_len(self) -> int:
        """Positions a sequence may use (the slab holds SPARE_POSITIONS more)."""
        return self.k.shape[3] - SPARE_POSITIONS

    @property
    def slab_positions(self) -> int:
        """Positions allocated per slot: max_seq_len + SPARE_POSITIONS."""
        return self.k.shape[3]

    @property
    def scratch_position(self) -> int:
        """A position no sequence ever reads or writes (the first spare one)."""
        return self.max_seq_len

    def write_prefill(self, layer: int, slot: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [1, H, T, D] -> positions start..start+T-1 of `slot`."""
        t = k.shape[2]
        self.k[layer, slot, :, start:start + t] = k[0]
        self.v[layer, slot, :, start:start + t] = v[0]

    def write_step(self, layer: int, rows: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [rows, H, 1, D] -> slot b at positions[b] for b < rows."""
        idx = torch.arange(rows, device=positions.device)
        self.k[layer, :rows][idx, :, positions] = k[:, :, 0]
        self.v[layer, :rows][idx, :, positions] = v[:, :, 0]

    def view(self, layer: int, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots 0..rows-1, positions 0..length-1: [rows, H, length, D] views (no copy)."""
        return self.k[layer, :rows, :, :length], self.v[layer, :rows, :, :length]

    def slot_view(self, layer: int, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer, slot:slot + 1, :, :length], self.v[layer, slot:slot + 1, :, :length]
