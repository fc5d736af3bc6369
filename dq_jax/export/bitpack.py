"""Bit packing of integer codes (the `.dqz` payload's `bitpack` encoding, docs/format.md).

The codes, in C order, form one bit stream; code i occupies stream bits [i*b, (i+1)*b), its
least significant bit first; stream bit j is bit (j mod 8) of byte j // 8 ("little" bit order,
as `numpy.packbits(..., bitorder="little")`); the last byte is zero-padded.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r} must be an integer in 1..8.")
    return int(bits)


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes of `count` codes packed at `bits` bits each: ceil(count*bits/8)."""
    return (int(count) * _check_bits(bits) + 7) // 8


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Packs unsigned codes (< 2**bits) into uint8 bytes, little-endian bit order.

    See the module docstring for the exact layout. Raises ValueError if a code
    does not fit in `bits` bits.
    """
    bits = _check_bits(bits)
    flat = np.asarray(codes).reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() >= 2 ** bits):
        raise ValueError(
            f"cannot pack codes in [{flat.min()}, {flat.max()}] at {bits} bits "
            f"(codes must lie in [0, {2 ** bits - 1}]).")
    flat = flat.astype(np.uint8)
    if bits == 8:
        return flat.copy()
    planes = (flat[:, None] >> np.arange(bits, dtype=np.uint8)) & np.uint8(1)
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """numpy inverse of `pack_bits`: the first `count` codes, uint8."""
    bits = _check_bits(bits)
    packed = np.asarray(packed, np.uint8).reshape(-1)
    if packed.size < packed_nbytes(count, bits):
        raise ValueError(f"{packed.size} bytes hold fewer than {count} codes at {bits} bits.")
    if bits == 8:
        return packed[:count].copy()
    planes = np.unpackbits(packed, bitorder="little", count=count * bits).reshape(count, bits)
    return (planes << np.arange(bits, dtype=np.uint8)).sum(axis=1, dtype=np.uint8)


def unpack_bits_jnp(packed: jax.Array, bits: int, count: int) -> jax.Array:
    """jnp inverse of `pack_bits` (bit ops, traceable under jit): uint8 [count].

    b in {1, 2, 4}: every byte holds 8/b whole codes (shift-and-mask per byte).
    b in {3, 5, 6, 7}: code i starts at bit p = i*b; it lies within the 16-bit
    little-endian word of bytes p//8 and p//8 + 1, so one two-byte gather, a
    shift by p % 8 and a mask decode it. Indices are int32: up to 2**28 codes.
    """
    bits = _check_bits(bits)
    packed = jnp.asarray(packed, jnp.uint8).reshape(-1)
    mask = (1 << bits) - 1
    if bits == 8:
        return packed[:count]
    if 8 % bits == 0:
        per_byte = 8 // bits
        shifts = jnp.arange(per_byte, dtype=jnp.uint8) * jnp.uint8(bits)
        codes = (packed[:, None] >> shifts[None, :]) & jnp.uint8(mask)
        return codes.reshape(-1)[:count]
    if count * bits >= 2 ** 31:
        raise ValueError(f"{count} codes at {bits} bits exceed the int32 bit index range.")
    padded = jnp.concatenate([packed, jnp.zeros((1,), jnp.uint8)])
    pos = jnp.arange(count, dtype=jnp.int32) * bits
    byte = pos >> 3
    word = padded[byte].astype(jnp.uint16) | (padded[byte + 1].astype(jnp.uint16) << 8)
    return ((word >> (pos & 7).astype(jnp.uint16)) & jnp.uint16(mask)).astype(jnp.uint8)
