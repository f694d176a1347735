"""KV caches for decoding: a growing cache for full attention and a rolling buffer for sliding-window
layers, both keeping, beside keys and values, the position of every cached key and whether it is a
real token or padding (left-padded batches).

- ``LayerKVCache``: keys/values (B, G, S, Dh) in buffers that grow by doubling, so appending a step
  writes into the buffer instead of copying the whole cache (a ``torch.cat`` per step is O(S) per
  token, O(S^2) per generation).
- ``RollingKVCache(window)``: Mistral's rolling buffer. Position p is stored in slot p % window, so
  memory stays at ``window`` keys per layer however long the generation runs; a chunk of T new tokens
  attends to the ring's contents and the chunk itself (chunked prefill), then its last ``window``
  keys overwrite the ring. With the window mask this equals attention over the full cache.
Multi-head latent attention stores its latent c_KV as the keys and its RoPE key as the values.

``update`` returns (k, v, k_pos_S, k_valid_BS): every key the new queries may need, with its absolute
position (-1: an empty slot) and its validity (False: padding), which the attention turns into the
causal / window / padding mask.

Shape legend: B batch, G kv heads, T new positions, S cached + new keys, Dh head dim.
"""

from __future__ import annotations

import torch


class LayerKVCache:
    def __init__(self) -> None:
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._valid: torch.Tensor | None = None  # (B, cap) bool
        self.padded = False  # any cached position is padding (else validity is not returned: no mask work)
        self.length = 0

    @property
    def k(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[:, :, :self.length]

    @property
    def v(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[:, :, :self.length]

    def update(self, k_BGTD: torch.Tensor, v_BGTD: torch.Tensor, valid_BT: torch.Tensor | None = None):
        B, _, T, _ = k_BGTD.shape
        end = self.length + T
        if self._k is None or end > self._k.shape[2] or self._k.shape[0] != B:
            cap = max(end, 2 * (0 if self._k is None else self._k.shape[2]), 64)
            k_buf = k_BGTD.new_empty(*k_BGTD.shape[:2], cap, k_BGTD.shape[3])
            v_buf = v_BGTD.new_empty(*v_BGTD.shape[:2], cap, v_BGTD.shape[3])
            valid = torch.ones(B, cap, dtype=torch.bool, device=k_BGTD.device)
            if self.length:
                k_buf[:, :, :self.length] = self._k[:, :, :self.length]
                v_buf[:, :, :self.length] = self._v[:, :, :self.length]
                valid[:, :self.length] = self._valid[:, :self.length]
            self._k, self._v, self._valid = k_buf, v_buf, valid
        self._k[:, :, self.length:end] = k_BGTD
        self._v[:, :, self.length:end] = v_BGTD
        self._valid[:, self.length:end] = True if valid_BT is None else valid_BT
        if valid_BT is not None and not self.padded:  # a host sync only when masks are in use
            self.padded = not bool(valid_BT.all())
        self.length = end
        k_pos_S = torch.arange(end, device=k_BGTD.device)
        return self.k, self.v, k_pos_S, self._valid[:, :end] if self.padded else None

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (speculative decoding rejects drafted tokens)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length

    def nbytes(self) -> int:
        """Bytes of the cached keys and values (not the spare capacity of the buffers)."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v) if t is not None)


class RollingKVCache:
    def __init__(self, window: int) -> None:
        self.window = window
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._pos: torch.Tensor | None = None  # (window,) long, -1 = empty
        self._valid: torch.Tensor | None = None  # (B, window) bool
        self.padded = False
        self.length = 0  # positions seen so far (not stored: at most `window` are)

    def update(self, k_BGTD: torch.Tensor, v_BGTD: torch.Tensor, valid_BT: torch.Tensor | None = None):
        B, G, T, D = k_BGTD.shape
        W, dev = self.window, k_BGTD.device
        if self._k is None:
            self._k = k_BGTD.new_zeros(B, G, W, D)
            self._v = v_BGTD.new_zeros(B, G, W, v_BGTD.shape[3])
            self._pos = torch.full((W,), -1, dtype=torch.long, device=dev)
            self._valid = torch.zeros(B, W, dtype=torch.bool, device=dev)
        if valid_BT is not None and not self.padded:
            self.padded = not bool(valid_BT.all())
        valid_BT = torch.ones(B, T, dtype=torch.bool, device=dev) if valid_BT is None else valid_BT
        new_pos_T = torch.arange(self.length, self.length + T, device=dev)
        # the new queries see the ring (the previous W positions) and the chunk itself
        k_all = torch.cat([self._k, k_BGTD], dim=2)
        v_all = torch.cat([self._v, v_BGTD], dim=2)
        pos_all = torch.cat([self._pos, new_pos_T])
        valid_all = torch.cat([self._valid, valid_BT], dim=1)
        keep = min(T, W)  # the chunk's last `keep` positions go into their slots
        slots = new_pos_T[-keep:] % W
        self._k[:, :, slots] = k_BGTD[:, :, -keep:]
        self._v[:, :, slots] = v_BGTD[:, :, -keep:]
        self._pos[slots] = new_pos_T[-keep:]
        self._valid[:, slots] = valid_BT[:, -keep:]
        self.length += T
        return k_all, v_all, pos_all, valid_all if self.padded else None  # empty slots: position -1

    def truncate(self, length: int) -> None:
        raise NotImplementedError("a rolling cache cannot roll back (its old keys are overwritten); "
                                  "use a full cache (model.new_cache(rolling=False))")

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self._k, self._v) if t is not None)


class KVCache:
    """One cache per block; ``seq_len`` is the number of positions already seen. ``windows[i]``: a
    rolling buffer of that many keys for layer i (None: the growing full cache)."""

    def __init__(self, num_layers: int, windows: list[int | None] | None = None) -> None:
        windows = windows or [None] * num_layers
        self.layers = [LayerKVCache() if w is None else RollingKVCache(w) for w in windows]

    @property
    def seq_len(self) -> int:
        return self.layers[0].length

    def truncate(self, length: int) -> None:
        for layer in self.layers:
            layer.truncate(length)

    def nbytes(self) -> int:
        """Bytes held by the cached keys and values."""
        return sum(layer.nbytes() for layer in self.layers)
