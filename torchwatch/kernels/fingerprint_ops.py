"""The weight fingerprint's arithmetic as torch ops: the CPU implementation and the twin of the
Triton kernel (``triton_fingerprint``), which must give the same sums bit for bit.

A tensor's bytes, zero-padded to whole 8-byte words, are read as little-endian uint64 words
``w[i]``. Word ``i`` of a tensor with salt ``s`` sits at position ``p = (s << 40) | i`` and is
mixed with a bijective 64-bit mixer (a position-keyed xor, then the splitmix64 finaliser)::

    x = w ^ ((p + 1) * G);  x *= M1;  x ^= x >> 31;  x *= M2;  x ^= x >> 29

and each chunk's fingerprint is the sum of its ``x`` modulo 2**64. The mixer is a bijection for
each position, so changing one word always changes its term (a single bit flip always shows);
the key depends on the position, so swapping two chunks or two same-shaped tensors changes the
sums; and two edits cancel only if two pseudo-random 64-bit differences do (chance 2**-64).

All arithmetic is on int64 with wrap-around; logical shifts are arithmetic shifts masked.
"""

from __future__ import annotations

import torch

G = 0x9E3779B97F4A7C15
M1 = 0xBF58476D1CE4E5B9
M2 = 0x94D049BB133111EB
SALT_BITS = 24
INDEX_BITS = 40
BLOCK = 1 << 16  # words per torch step on CPU: temporaries stay in L2
GPU_BLOCK = 1 << 22  # on an accelerator: 32 MB per temporary, few launches

_MASK64 = (1 << 64) - 1


def signed(v: int) -> int:
    """The int64 with the same 64 bits as the unsigned ``v``."""
    v &= _MASK64
    return v - (1 << 64) if v >= 1 << 63 else v


def unsigned(v: int) -> int:
    return v & _MASK64


def position(salt: int, index: int) -> int:
    return (salt << INDEX_BITS) | index


def as_words(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as a 1-D int64 tensor, zero-padded to whole words (a view when possible)."""
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    n = flat.numel()
    if n % 8 == 0 and flat.data_ptr() % 8 == 0:
        return flat.view(torch.int64)
    words = torch.zeros((n + 7) // 8, dtype=torch.int64, device=t.device)
    words.view(torch.uint8)[:n].copy_(flat)
    return words


class TorchMixer:
    """Chunk sums with torch ops on any device; reuses its buffers between calls.

    ``block`` words are mixed per step: small on CPU (temporaries stay in L2), large on an
    accelerator (fewer launches). Block and chunk sizes are powers of two, so one divides the other.
    """

    def __init__(self, device: torch.device, block: int | None = None) -> None:
        self.block = block or (BLOCK if device.type == "cpu" else GPU_BLOCK)
        self.keys = (torch.arange(1, self.block + 1, dtype=torch.int64, device=device) * signed(G)).contiguous()
        self.x = torch.empty(self.block, dtype=torch.int64, device=device)
        self.t = torch.empty(self.block, dtype=torch.int64, device=device)
        self.k = torch.empty(self.block, dtype=torch.int64, device=device)

    def chunk_sums(self, words: torch.Tensor, salt: int, chunk_words: int) -> list[int]:
        """Unsigned 64-bit sums of each ``chunk_words`` chunk of ``words`` (int64, 1-D)."""
        n = words.numel()
        if n == 0:
            return []
        sums: list[torch.Tensor] = []
        if self.block >= chunk_words:  # a step covers whole chunks: sum each row of a (chunks, words) view
            for b0 in range(0, n, self.block):
                x = self._mix(words[b0 : b0 + self.block], position(salt, b0))
                full = x.numel() // chunk_words
                if full:
                    sums.append(x[: full * chunk_words].view(full, chunk_words).sum(1))
                if x.numel() % chunk_words:
                    sums.append(x[full * chunk_words :].sum().view(1))
        else:  # a chunk takes several steps
            for c0 in range(0, n, chunk_words):
                parts = [
                    self._mix(words[b0 : min(b0 + self.block, c0 + chunk_words, n)], position(salt, b0)).sum()
                    for b0 in range(c0, min(c0 + chunk_words, n), self.block)
                ]
                sums.append(torch.stack(parts).sum().view(1))
        # one read at the end (one device sync on an accelerator)
        return [unsigned(v) for v in torch.cat(sums).tolist()]

    def _mix(self, w: torch.Tensor, p0: int) -> torch.Tensor:
        m = w.numel()
        x, t, k = self.x[:m], self.t[:m], self.k[:m]
        # (p0 + i + 1) * G == p0 * G + (i + 1) * G  (mod 2**64)
        torch.add(self.keys[:m], signed(p0 * G), out=k)
        torch.bitwise_xor(w, k, out=x)
        x.mul_(signed(M1))
        torch.bitwise_right_shift(x, 31, out=t)
        t.bitwise_and_((1 << 33) - 1)
        x.bitwise_xor_(t)
        x.mul_(signed(M2))
        torch.bitwise_right_shift(x, 29, out=t)
        t.bitwise_and_((1 << 35) - 1)
        x.bitwise_xor_(t)
        return x
