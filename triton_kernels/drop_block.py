"""DropBlock Triton kernels (the GPU path; also runs on CPU tensors under TRITON_INTERPRET=1).

Memory is walked as a dense (outer, inner) matrix, the same for every kernel:
  contiguous (N, C, *spatial):  outer = N*C*D*H, inner = W
  channels-last contiguous:     outer = N*D*H*W, inner = C
(1-D inputs have D = H = 1, 2-D ones D = 1.) The keep mask is bit-packed along `inner`:
uint8 [outer, ceil(inner / 8)], bit j of byte b = unit 8b + j, 1 = kept: about 1 bit per unit,
and the same format as the CPU kernels (csrc/drop_block).

Forward = three launches (four for channels-last 2-D/3-D):
  1. _seed_words_kernel: Bernoulli(gamma) seeds from Philox (tl.randint4x keyed by a seed drawn
     from torch's generator), packed 32 to a word along the bit axis of the layout. For
     gamma <= 1/16 (DropBlock's usual range) it draws the geometric gaps between seeds, so
     its work follows the number of seeds; above, a 16-bit draw per position and a second on
     exact ties (P(seed) = floor(gamma * 2^32) / 2^32). Also resets the drop counter.
  2. Dilation into blocks + count: _dilate_rows64_kernel (contiguous, W <= 64: one row per
     lane as 64 bits), else _dilate_kernel (32-unit output words: bit shifts along W for the
     contiguous layout; for channels-last, word ORs along W after _vertical_or_kernel did D
     and H). Stores the keep bits and adds the dropped count to a global counter.
  3. _apply_kernel: out = x * keep * scale, scale = units / (units - dropped + 1e-7) read from
     the counter on the device (no host sync). Flat and vectorized when inner % 8 == 0 (the
     mask has no row padding then), row tiles otherwise. The backward is this kernel on the
     gradient.
Launches 1-2 touch ~N/8 bytes each; launch 3 moves the tensor once in and once out.
The geometry (spatial sizes, block, words per row) is constexpr: index math compiles to
multiplies and shifts, at the price of one compile per feature-map shape. Batch size, channel
count (contiguous layout) and gamma are runtime arguments.
"""
import math
import os
from typing import NamedTuple, Sequence

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.language.extra.cuda import libdevice

_SEED_WORDS_BLOCK = 128  # words (x32 seed positions) per program
_DILATE_BLOCK = 256      # output words per program
_APPLY_ELEMS = 4096      # elements per apply program
_SPARSE_GAMMA = 1.0 / 16  # seed rates up to this walk geometric gaps (<= 2 seeds per word on average)


class Geometry(NamedTuple):
    N: int
    C: int
    D: int
    H: int
    W: int
    kd: int
    kh: int
    kw: int
    couple: bool
    valid_only: bool
    channels_last: bool

    @property
    def inner(self) -> int:
        return self.C if self.channels_last else self.W

    @property
    def outer(self) -> int:
        return self.N * self.D * self.H * self.W if self.channels_last else self.N * self.C * self.D * self.H

    @property
    def nb(self) -> int:
        return (self.inner + 7) // 8

    @property
    def units(self) -> int:
        """Units of the seed-plane grid (what the scale counts, as timm does)."""
        return self.N * (1 if self.couple else self.C) * self.D * self.H * self.W

    def seed_grid(self):
        """(rows, words per row) of the seed-word buffer."""
        if not self.channels_last:
            return self.N * (1 if self.couple else self.C) * self.D * self.H, triton.cdiv(self.W, 32)
        return self.N * self.D * self.H * self.W, 1 if self.couple else triton.cdiv(self.C, 32)


def geometry(shape: Sequence[int], block: Sequence[int], couple: bool, valid_only: bool,
             channels_last: bool) -> Geometry:
    nd = len(shape) - 2
    sp = [1] * (3 - nd) + list(shape[2:])
    bk = [1] * (3 - nd) + list(block)
    return Geometry(shape[0], shape[1], *sp, *bk, couple, valid_only, channels_last)


def _before(k):  # a block around seed s covers [s - k // 2, s + (k - 1) // 2]
    return (k - 1) // 2


def _after(k):
    return k // 2


def _seed_range(size, k, valid_only):
    """Inclusive [lo, hi] of the seed positions along an axis."""
    if not valid_only:
        return 0, size - 1
    return _after(k), size - 1 - _before(k)


def _threshold(gamma: float):
    """(all, thr): a position is a seed when its uint32 draw < thr (thr = gamma * 2^32)."""
    if gamma >= 1.0:
        return True, 0
    t = int(gamma * 4294967296.0)
    return False, t - (1 << 32) if t >= (1 << 31) else t  # the uint32 bits as an int32


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _valid_bits(lo, hi):
    """uint32 with bits [lo, hi) set, 0 <= lo, hi <= 32 (computed in 64 bits: shifts by 32)."""
    one = tl.full(lo.shape, 1, tl.uint64)
    lo = lo.to(tl.uint64)
    hi = tl.maximum(hi, 0).to(tl.uint64)
    return tl.where(hi > lo, ((one << hi) - 1) ^ ((one << lo) - 1), 0).to(tl.uint32)


@triton.jit
def _gap(c, inv_log2_keep, FAST_LOG: tl.constexpr):
    """Non-seeds before the next seed, from a uniform uint32 c: floor(log(u) / log(1 - gamma)),
    u = (c >> 8 + 1) / 2^24 in (0, 1]; geometric, P(gap >= g) = (1 - gamma)^g. Capped at 64.
    FAST_LOG (GPU): the hardware log2 (one MUFU op, rel. error ~2^-22) instead of the precise
    polynomial; the interpreter has no libdevice."""
    u = ((c >> 8).to(tl.float32) + 1.0) * 5.9604644775390625e-08
    if FAST_LOG:
        lg = libdevice.fast_log2f(u)
    else:
        lg = tl.log2(u)
    g = tl.floor(lg * inv_log2_keep)
    return tl.minimum(g, 64.0).to(tl.int32)


@triton.jit
def _set_bit(word, pos):
    return word | tl.where(pos < 32, tl.full(pos.shape, 1, tl.uint32) << tl.minimum(pos, 31).to(tl.uint32), 0)


@triton.jit(do_not_specialize=["thr_bits", "inv_log2_keep"])
def _seed_words_kernel(seed_ptr, s_ptr, stats_ptr, n_words, units, thr_bits, inv_log2_keep,
                       D: tl.constexpr, H: tl.constexpr, W: tl.constexpr, NWS: tl.constexpr,
                       LO_D: tl.constexpr, HI_D: tl.constexpr, LO_H: tl.constexpr, HI_H: tl.constexpr,
                       LO_W: tl.constexpr, HI_W: tl.constexpr, COL_LO: tl.constexpr, COL_HI: tl.constexpr,
                       ALL: tl.constexpr, SPARSE: tl.constexpr, FAST_LOG: tl.constexpr, CHANNELS: tl.constexpr,
                       COUPLED: tl.constexpr, IDX64: tl.constexpr, BLOCK: tl.constexpr):
    # s_ptr: int32 [n_words] = [rows, NWS] seed words (see Geometry.seed_grid); bit j of word
    # (r, ws) is position 32*ws + j along W (contiguous) or C (channels-last, uncoupled); for
    # channels-last coupled, a word is all ones or zero (one draw per (n, d, h, w)).
    # Seed positions: [LO, HI] per spatial axis, [COL_LO, COL_HI] along the bit axis.
    # The geometry is constexpr: index math compiles to multiplies and shifts.
    pid = tl.program_id(0)
    if pid == 0:
        tl.store(stats_ptr, 0)
        tl.store(stats_ptr + 1, units)
    if IDX64:
        widx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        widx = pid * BLOCK + tl.arange(0, BLOCK)
    inb = widx < n_words
    r = widx // NWS
    ws = widx % NWS
    if CHANNELS:
        w = r % W
        t = r // W
        h = t % H
        d = (t // H) % D
        row_ok = inb & (w >= LO_W) & (w <= HI_W)
    else:
        h = r % H
        d = (r // H) % D
        row_ok = inb
    row_ok = row_ok & (d >= LO_D) & (d <= HI_D) & (h >= LO_H) & (h <= HI_H)
    seed = tl.load(seed_ptr)
    thr = thr_bits.to(tl.uint32, bitcast=True)
    if CHANNELS and COUPLED:
        if ALL:
            hit = row_ok
        else:
            c0, _, _, _ = tl.randint4x(seed, widx)
            hit = row_ok & (c0 < thr)
        word = tl.where(hit, 0xFFFFFFFF, 0).to(tl.uint32)
    else:
        # the word's seed positions, as a bit mask (bounds tested once per word, not per bit)
        base = ws * 32
        valid = _valid_bits(tl.minimum(tl.maximum(COL_LO - base, 0), 32), tl.minimum(COL_HI + 1 - base, 32))
        valid = tl.where(row_ok, valid, 0)
        if ALL:
            word = valid
        elif SPARSE:
            # gamma <= 1/16: walk the geometric gaps between seeds (i.i.d. Bernoulli(gamma)
            # positions, by the memoryless property also from the start of each word). One
            # Philox call gives the first 4 gaps; more calls only while some word of the block
            # still has room. Work follows the number of seeds, not of positions.
            c0, c1, c2, c3 = tl.randint4x(seed, widx)
            pos = _gap(c0, inv_log2_keep, FAST_LOG)
            word = _set_bit(tl.zeros([BLOCK], tl.uint32), pos)
            pos = pos + 1 + _gap(c1, inv_log2_keep, FAST_LOG)
            word = _set_bit(word, pos)
            pos = pos + 1 + _gap(c2, inv_log2_keep, FAST_LOG)
            word = _set_bit(word, pos)
            pos = pos + 1 + _gap(c3, inv_log2_keep, FAST_LOG)
            word = _set_bit(word, pos)
            rnd = 1
            while tl.max(tl.where(inb & (pos < 31), 1, 0), axis=0) > 0:
                e0, e1, e2, e3 = tl.randint4x(seed, widx + n_words * rnd)
                pos = tl.minimum(pos + 1 + _gap(e0, inv_log2_keep, FAST_LOG), 64)
                word = _set_bit(word, pos)
                pos = tl.minimum(pos + 1 + _gap(e1, inv_log2_keep, FAST_LOG), 64)
                word = _set_bit(word, pos)
                pos = tl.minimum(pos + 1 + _gap(e2, inv_log2_keep, FAST_LOG), 64)
                word = _set_bit(word, pos)
                pos = tl.minimum(pos + 1 + _gap(e3, inv_log2_keep, FAST_LOG), 64)
                word = _set_bit(word, pos)
                rnd += 1
            word = word & valid
        else:
            # 32 positions from 4 Philox calls: each 32-bit output holds two 16-bit draws u.
            # Position j is a seed when u_j < thr >> 16; on a tie (u_j == thr >> 16, p = 2^-16)
            # a second 16-bit draw v_j decides (v_j < thr & 0xFFFF): exactly P = thr / 2^32,
            # at half the Philox work of a 32-bit draw per position. Ties are resolved only in
            # blocks that have one. Bit 8k + 2m + h <- call k, output m, half h.
            thr_hi = thr >> 16
            k = tl.arange(0, 4)
            ctr = widx[:, None] * 4 + k[None, :]
            sh = (k * 8).to(tl.uint32)[None, :]
            c0, c1, c2, c3 = tl.randint4x(seed, ctr)
            hits = (((c0 & 0xFFFF) < thr_hi).to(tl.uint32) << sh) \
                | (((c0 >> 16) < thr_hi).to(tl.uint32) << (sh + 1))
            hits |= (((c1 & 0xFFFF) < thr_hi).to(tl.uint32) << (sh + 2)) \
                | (((c1 >> 16) < thr_hi).to(tl.uint32) << (sh + 3))
            hits |= (((c2 & 0xFFFF) < thr_hi).to(tl.uint32) << (sh + 4)) \
                | (((c2 >> 16) < thr_hi).to(tl.uint32) << (sh + 5))
            hits |= (((c3 & 0xFFFF) < thr_hi).to(tl.uint32) << (sh + 6)) \
                | (((c3 >> 16) < thr_hi).to(tl.uint32) << (sh + 7))
            ntie = (((c0 & 0xFFFF) == thr_hi).to(tl.int32) + ((c0 >> 16) == thr_hi).to(tl.int32)
                    + ((c1 & 0xFFFF) == thr_hi).to(tl.int32) + ((c1 >> 16) == thr_hi).to(tl.int32)
                    + ((c2 & 0xFFFF) == thr_hi).to(tl.int32) + ((c2 >> 16) == thr_hi).to(tl.int32)
                    + ((c3 & 0xFFFF) == thr_hi).to(tl.int32) + ((c3 >> 16) == thr_hi).to(tl.int32))
            if tl.sum(tl.sum(ntie, axis=1), axis=0) != 0:
                # second draws: another Philox stream (counters offset by n_words * 4)
                thr_lo = thr & 0xFFFF
                d0, d1, d2, d3 = tl.randint4x(seed, ctr + n_words * 4)
                hits |= ((((c0 & 0xFFFF) == thr_hi) & ((d0 & 0xFFFF) < thr_lo)).to(tl.uint32) << sh)
                hits |= ((((c0 >> 16) == thr_hi) & ((d0 >> 16) < thr_lo)).to(tl.uint32) << (sh + 1))
                hits |= ((((c1 & 0xFFFF) == thr_hi) & ((d1 & 0xFFFF) < thr_lo)).to(tl.uint32) << (sh + 2))
                hits |= ((((c1 >> 16) == thr_hi) & ((d1 >> 16) < thr_lo)).to(tl.uint32) << (sh + 3))
                hits |= ((((c2 & 0xFFFF) == thr_hi) & ((d2 & 0xFFFF) < thr_lo)).to(tl.uint32) << (sh + 4))
                hits |= ((((c2 >> 16) == thr_hi) & ((d2 >> 16) < thr_lo)).to(tl.uint32) << (sh + 5))
                hits |= ((((c3 & 0xFFFF) == thr_hi) & ((d3 & 0xFFFF) < thr_lo)).to(tl.uint32) << (sh + 6))
                hits |= ((((c3 >> 16) == thr_hi) & ((d3 >> 16) < thr_lo)).to(tl.uint32) << (sh + 7))
            word = tl.reduce(hits, 1, _or) & valid
    tl.store(s_ptr + widx, word.to(tl.int32, bitcast=True), mask=inb)


@triton.jit
def _load_word(ptr, mask):
    return tl.load(ptr, mask=mask, other=0).to(tl.uint32, bitcast=True)


@triton.jit
def _popcount(v):
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    return (v * 0x01010101) >> 24


@triton.jit
def _dilate_rows64_kernel(s_ptr, mask_ptr, stats_ptr, n_rows,
                          NWS: tl.constexpr, NB: tl.constexpr, W: tl.constexpr, C: tl.constexpr,
                          D: tl.constexpr, H: tl.constexpr,
                          AD: tl.constexpr, BD: tl.constexpr, AH: tl.constexpr, BH: tl.constexpr,
                          AW: tl.constexpr, BW: tl.constexpr,
                          COUPLED: tl.constexpr, IDX64: tl.constexpr, BLOCK: tl.constexpr):
    # Contiguous layout with W <= 64 (NWS <= 2 seed words per row): one memory row per lane,
    # held as 64 bits. Same rule as _dilate_kernel: unit i dropped when a seed is in [i - a, i + b].
    pid = tl.program_id(0)
    if IDX64:
        r = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        r = pid * BLOCK + tl.arange(0, BLOCK)
    inb = r < n_rows
    h = r % H
    t = r // H
    d = t % D
    plane = t // D
    if COUPLED:
        ps = plane // C
    else:
        ps = plane
    v = tl.zeros([BLOCK], tl.uint64)
    for dd in range(0, AD + BD + 1):
        d2 = d + dd - AD
        okd = inb & (d2 >= 0) & (d2 < D)
        for dh in range(0, AH + BH + 1):
            h2 = h + dh - AH
            m = okd & (h2 >= 0) & (h2 < H)
            p = s_ptr + ((ps * D + d2) * H + h2) * NWS
            v = v | _load_word(p, m).to(tl.uint64)
            if NWS > 1:
                v = v | (_load_word(p + 1, m).to(tl.uint64) << 32)
    acc = v
    for e in tl.static_range(1, BW + 1):  # seed at unit i + e
        acc = acc | (v >> e)
    for e in tl.static_range(1, AW + 1):  # seed at unit i - e
        acc = acc | (v << e)
    valid = tl.full([BLOCK], (1 << W) - 1 if W < 64 else -1, tl.int64).to(tl.uint64, bitcast=True)
    drop = acc & valid
    keep = drop ^ valid
    if COUPLED:
        drop = tl.where(plane % C == 0, drop, 0)  # count each seed plane once
    lo = (drop & 0xFFFFFFFF).to(tl.uint32)
    hi = (drop >> 32).to(tl.uint32)
    cnt = tl.where(inb, _popcount(lo) + _popcount(hi), 0)
    tl.atomic_add(stats_ptr, tl.sum(cnt.to(tl.int64), axis=0))
    for i in tl.static_range(NB):
        tl.store(mask_ptr + r * NB + i, ((keep >> (8 * i)) & 0xFF).to(tl.uint8), mask=inb)


@triton.jit
def _vertical_or_kernel(s_ptr, t_ptr, n_words, NWS: tl.constexpr, D: tl.constexpr, H: tl.constexpr,
                        W: tl.constexpr, AD: tl.constexpr, BD: tl.constexpr, AH: tl.constexpr, BH: tl.constexpr,
                        IDX64: tl.constexpr, BLOCK: tl.constexpr):
    # Channels-last, first of two separable passes: t[(n, d, h, w), ws] = OR of the seed words
    # over the block's D and H window; _dilate_kernel then ORs along W only (kd*kh + kw loads
    # per word instead of kd*kh*kw).
    pid = tl.program_id(0)
    if IDX64:
        widx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        widx = pid * BLOCK + tl.arange(0, BLOCK)
    inb = widx < n_words
    r = widx // NWS
    ws = widx % NWS
    w = r % W
    t = r // W
    h = t % H
    t = t // H
    d = t % D
    n = t // D
    acc = tl.zeros([BLOCK], tl.uint32)
    for dd in range(0, AD + BD + 1):
        d2 = d + dd - AD
        okd = inb & (d2 >= 0) & (d2 < D)
        for dh in range(0, AH + BH + 1):
            h2 = h + dh - AH
            m = okd & (h2 >= 0) & (h2 < H)
            acc = acc | _load_word(s_ptr + (((n * D + d2) * H + h2) * W + w) * NWS + ws, m)
    tl.store(t_ptr + widx, acc.to(tl.int32, bitcast=True), mask=inb)


@triton.jit
def _dilate_kernel(s_ptr, mask_ptr, stats_ptr, n_words,
                   NW: tl.constexpr, NWS: tl.constexpr, NB: tl.constexpr, INNER: tl.constexpr, C: tl.constexpr,
                   D: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
                   AD: tl.constexpr, BD: tl.constexpr, AH: tl.constexpr, BH: tl.constexpr,
                   AW: tl.constexpr, BW: tl.constexpr,
                   CHANNELS: tl.constexpr, COUPLED: tl.constexpr, NEAR: tl.constexpr,
                   IDX64: tl.constexpr, BLOCK: tl.constexpr):
    # Output word (r, wo): units 32*wo .. 32*wo + 31 of memory row r. Unit i (per axis) is
    # dropped when a seed lies in [i - a, i + b] (a = (k - 1) // 2, b = k // 2).
    # NEAR: the W-reach max(AW, BW) <= 32, so only the seed words wo - 1, wo, wo + 1 matter.
    # C is only used (coupled, contiguous) to map a plane to its seed plane.
    pid = tl.program_id(0)
    if IDX64:
        widx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        widx = pid * BLOCK + tl.arange(0, BLOCK)
    inb = widx < n_words
    r = widx // NW
    wo = widx % NW
    if CHANNELS:
        w = r % W
        t = r // W
        h = t % H
        t = t // H
        d = t % D
        n = t // D
        if COUPLED:
            ws = wo * 0
        else:
            ws = wo
        acc = tl.zeros([BLOCK], tl.uint32)
        for dd in range(0, AD + BD + 1):
            d2 = d + dd - AD
            okd = inb & (d2 >= 0) & (d2 < D)
            for dh in range(0, AH + BH + 1):
                h2 = h + dh - AH
                okh = okd & (h2 >= 0) & (h2 < H)
                for dw in range(0, AW + BW + 1):
                    w2 = w + dw - AW
                    m = okh & (w2 >= 0) & (w2 < W)
                    acc = acc | _load_word(s_ptr + (((n * D + d2) * H + h2) * W + w2) * NWS + ws, m)
        drop = acc
    else:
        h = r % H
        t = r // H
        d = t % D
        plane = t // D
        if COUPLED:
            ps = plane // C
        else:
            ps = plane
        # loops start at 0 and stay in the kernel body: triton 3.6's interpreter needs both
        if NEAR:
            v0 = tl.zeros([BLOCK], tl.uint32)
            vm = tl.zeros([BLOCK], tl.uint32)
            vp = tl.zeros([BLOCK], tl.uint32)
            okm = inb & (wo >= 1)
            okp = inb & (wo + 1 < NWS)
            for dd in range(0, AD + BD + 1):
                d2 = d + dd - AD
                okd = (d2 >= 0) & (d2 < D)
                for dh in range(0, AH + BH + 1):
                    h2 = h + dh - AH
                    m = okd & (h2 >= 0) & (h2 < H)
                    p = s_ptr + ((ps * D + d2) * H + h2) * NWS + wo
                    v0 = v0 | _load_word(p, m & inb)
                    if NWS > 1:
                        vm = vm | _load_word(p - 1, m & okm)
                        vp = vp | _load_word(p + 1, m & okp)
            x = v0.to(tl.uint64) | (vp.to(tl.uint64) << 32)  # units 32*wo .. 32*wo + 63
            y = vm.to(tl.uint64) | (v0.to(tl.uint64) << 32)  # units 32*wo - 32 .. 32*wo + 31
            acc = tl.zeros([BLOCK], tl.uint64)
            for e in tl.static_range(0, BW + 1):  # seed at unit i + e
                acc = acc | (x >> e)
            for e in tl.static_range(1, AW + 1):  # seed at unit i - e
                acc = acc | (y >> (32 - e))
            drop = (acc & 0xFFFFFFFF).to(tl.uint32)
        else:
            # any reach (slow, rare: kw > 65): unit i + e, e = eo - 32*QOFF, is bit rr of
            # word wo + q with eo = 32*(q + QOFF) + rr
            QOFF: tl.constexpr = (AW + 31) // 32
            acc = tl.zeros([BLOCK], tl.uint64)
            for e0 in range(0, AW + BW + 1):
                eo = e0 - AW + 32 * QOFF
                q = eo // 32 - QOFF
                rr = eo % 32
                lo = tl.zeros([BLOCK], tl.uint32)
                hi = tl.zeros([BLOCK], tl.uint32)
                oklo = inb & (wo + q >= 0) & (wo + q < NWS)
                okhi = inb & (wo + q + 1 >= 0) & (wo + q + 1 < NWS)
                for dd in range(0, AD + BD + 1):
                    d2 = d + dd - AD
                    okd = (d2 >= 0) & (d2 < D)
                    for dh in range(0, AH + BH + 1):
                        h2 = h + dh - AH
                        m = okd & (h2 >= 0) & (h2 < H)
                        p = s_ptr + ((ps * D + d2) * H + h2) * NWS + wo + q
                        lo = lo | _load_word(p, m & oklo)
                        hi = hi | _load_word(p + 1, m & okhi)
                acc = acc | ((lo.to(tl.uint64) | (hi.to(tl.uint64) << 32)) >> rr)
            drop = (acc & 0xFFFFFFFF).to(tl.uint32)
    valid = tl.where(inb, _valid_bits(wo * 0, tl.minimum(INNER - wo * 32, 32)), 0)
    drop = drop & valid
    keep = valid ^ drop  # drop is a subset of valid; (~ on uint32 breaks the interpreter)
    # count each seed-plane unit once: coupled channels repeat one plane C times
    if COUPLED:
        if CHANNELS:
            counted = drop & tl.where(wo == 0, 1, 0).to(tl.uint32)
        else:
            counted = tl.where(plane % C == 0, drop, 0)
    else:
        counted = drop
    tl.atomic_add(stats_ptr, tl.sum(_popcount(counted).to(tl.int64), axis=0))
    base = r * NB + wo * 4
    for i in tl.static_range(4):
        tl.store(mask_ptr + base + i, ((keep >> (8 * i)) & 0xFF).to(tl.uint8),
                 mask=inb & (wo * 4 + i < NB))


@triton.jit
def _bf16_rne(y):
    """float32 -> bfloat16, round to nearest even, with integer ops. Only used under
    TRITON_INTERPRET, whose bfloat16 cast truncates; GPUs round to nearest even natively."""
    u = y.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = tl.where(y != y, (u >> 16) | 0x40, r)  # NaN stays NaN (quiet)
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _apply_kernel(x_ptr, out_ptr, mask_ptr, stats_ptr, seed_ptr, NUMEL, OUTER, INNER, NB, CDH, DH,
                  SCALE: tl.constexpr, NOISE: tl.constexpr, NOISE_SHARED: tl.constexpr, CHANNELS: tl.constexpr,
                  RNE_BF16: tl.constexpr, FLAT: tl.constexpr, IDX64: tl.constexpr, BO: tl.constexpr,
                  BI: tl.constexpr):
    # x, out: dense [OUTER, INNER] (out may be x). out = x * keep * scale; with NOISE,
    # out = x * keep + N(0, 1) * (1 - keep), unscaled (timm's with_noise). NOISE_SHARED: coupled
    # channels share the noise (timm draws it with the mask's shape): keyed by (n, d, h, w).
    # FLAT (INNER % 8 == 0): the mask rows have no padding, so bit m is element m: a 1-D
    # block of BO * BI elements, vectorized loads, no index math. Otherwise a [BO, BI] tile of
    # rows (BI >= INNER or a column chunk), each row reading its own mask bytes.
    po = tl.program_id(0)
    if FLAT:
        # BO rows of 8 elements: one mask byte per row, broadcast over its 8 bits
        if IDX64:
            r8 = po.to(tl.int64) * BO + tl.arange(0, BO)
        else:
            r8 = po * BO + tl.arange(0, BO)
        b8 = tl.arange(0, 8)
        offs = r8[:, None] * 8 + b8[None, :]
        ok = offs < NUMEL  # its own argument: Triton sees NUMEL % 16 == 0 and vectorizes
        byte = tl.load(mask_ptr + r8, mask=r8 * 8 < NUMEL, other=0)
        keep = ((byte[:, None] >> b8.to(tl.uint8)[None, :]) & 1) != 0
        o = offs // INNER  # only used for shared noise
        i = offs % INNER
    else:
        # [BO rows, BI // 8 mask bytes, 8 bits]: one load per mask byte
        pi = tl.program_id(1)
        if IDX64:
            o1 = po.to(tl.int64) * BO + tl.arange(0, BO)
        else:
            o1 = po * BO + tl.arange(0, BO)
        jb = pi * (BI // 8) + tl.arange(0, BI // 8)
        b8 = tl.arange(0, 8)
        i = (jb * 8)[None, :, None] + b8[None, None, :]
        o = o1[:, None, None] + i * 0
        ok = (o < OUTER) & (i < INNER)
        offs = o * INNER + i
        byte = tl.load(mask_ptr + o1[:, None] * NB + jb[None, :], mask=(o1 < OUTER)[:, None] & (jb < NB)[None, :],
                       other=0)
        keep = ((byte[:, :, None] >> b8.to(tl.uint8)[None, None, :]) & 1) != 0
    x = tl.load(x_ptr + offs, mask=ok, other=0)
    if x.dtype == tl.float64:
        xf = x
    else:
        xf = x.to(tl.float32)
    if NOISE:
        seed = tl.load(seed_ptr)
        if NOISE_SHARED:
            if CHANNELS:  # row o is the (n, d, h, w) unit
                noffs = o
            else:  # row o = (n*C + c)*D*H + dh -> (n*D*H + dh)*W + i
                noffs = ((o // CDH) * DH + o % DH) * INNER + i
        else:
            noffs = offs
        z = tl.randn(seed ^ 0x5BD1E995, noffs)
        y = xf * keep.to(xf.dtype) + z.to(xf.dtype) * (1 - keep.to(xf.dtype))
    elif SCALE:
        dropped = tl.load(stats_ptr)
        units = tl.load(stats_ptr + 1)
        # float32 as timm: units * (1 / (kept + 1e-7)), correctly rounded
        rcp = tl.div_rn(tl.full([], 1.0, tl.float32), (units - dropped).to(tl.float32) + 1e-7)
        s = units.to(tl.float32) * rcp
        y = xf * tl.where(keep, s, 0.0).to(xf.dtype)
    else:
        y = xf * keep.to(xf.dtype)
    if RNE_BF16:
        tl.store(out_ptr + offs, _bf16_rne(y), mask=ok)
    else:
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=ok)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _idx64(*counts) -> bool:
    return max(counts) >= 2 ** 31 - 2 ** 20


def seed_words(x: torch.Tensor, seed: torch.Tensor, g: Geometry, gamma: float, stats: torch.Tensor) -> torch.Tensor:
    """Launch 1: the seed words (int32, see Geometry.seed_grid); resets stats to (0, units)."""
    rows, nws = g.seed_grid()
    n_words = rows * nws
    s = torch.empty(max(n_words, 1), dtype=torch.int32, device=x.device)
    lo_d, hi_d = _seed_range(g.D, g.kd, g.valid_only)
    lo_h, hi_h = _seed_range(g.H, g.kh, g.valid_only)
    lo_w, hi_w = _seed_range(g.W, g.kw, g.valid_only)
    col_lo, col_hi = (0, g.C - 1) if g.channels_last else (lo_w, hi_w)
    all_, thr = _threshold(gamma)
    sparse = 0.0 < gamma <= _SPARSE_GAMMA
    # 1 / log2(1 - gamma) via log1p: 1 - gamma rounds to 1 below gamma ~1e-16 (a division by zero);
    # clamped to float32's range for the kernel argument (the gaps cap at 64 anyway)
    inv = max(math.log(2.0) / math.log1p(-gamma), -3.0e38) if sparse else 0.0
    grid = (max(1, triton.cdiv(n_words, _SEED_WORDS_BLOCK)),)
    # geometry is constexpr (one compile per feature-map shape); N and gamma are runtime
    wrap_triton(_seed_words_kernel)[grid](
        seed, s, stats, n_words, g.units, thr, inv, D=g.D, H=g.H, W=g.W, NWS=nws,
        LO_D=lo_d, HI_D=hi_d, LO_H=lo_h, HI_H=hi_h, LO_W=lo_w, HI_W=hi_w, COL_LO=col_lo, COL_HI=col_hi,
        ALL=all_, SPARSE=sparse, FAST_LOG=not _interpreted(), CHANNELS=g.channels_last, COUPLED=g.couple,
        IDX64=_idx64(n_words * 8 + 8),
        BLOCK=_SEED_WORDS_BLOCK, num_warps=4)
    return s


def build_mask(x: torch.Tensor, seed: torch.Tensor, g: Geometry, gamma: float):
    """Launches 1-2: (mask uint8 [outer, nb], stats int64 [2] = (dropped, units))."""
    stats = torch.empty(2, dtype=torch.int64, device=x.device)
    mask = torch.empty((g.outer, g.nb), dtype=torch.uint8, device=x.device)
    s = seed_words(x, seed, g, gamma, stats)
    _, nws = g.seed_grid()
    if not g.channels_last and g.W <= 64:
        grid = (max(1, triton.cdiv(g.outer, _DILATE_BLOCK)),)
        wrap_triton(_dilate_rows64_kernel)[grid](
            s, mask, stats, g.outer, NWS=nws, NB=g.nb, W=g.W, C=g.C if g.couple else 1, D=g.D, H=g.H,
            AD=_before(g.kd), BD=_after(g.kd), AH=_before(g.kh), BH=_after(g.kh), AW=_before(g.kw), BW=_after(g.kw),
            COUPLED=g.couple, IDX64=_idx64(g.outer + _DILATE_BLOCK, len(s) + 1, g.outer * g.nb + 8),
            BLOCK=_DILATE_BLOCK, num_warps=4)
        return mask, stats
    ad, bd, ah, bh = _before(g.kd), _after(g.kd), _before(g.kh), _after(g.kh)
    if g.channels_last and g.kd * g.kh > 1:  # separable: D/H first, then W in _dilate_kernel
        rows, _ = g.seed_grid()
        t = torch.empty_like(s)
        grid = (max(1, triton.cdiv(rows * nws, _DILATE_BLOCK)),)
        wrap_triton(_vertical_or_kernel)[grid](
            s, t, rows * nws, NWS=nws, D=g.D, H=g.H, W=g.W, AD=ad, BD=bd, AH=ah, BH=bh,
            IDX64=_idx64(rows * nws + _DILATE_BLOCK), BLOCK=_DILATE_BLOCK, num_warps=4)
        s, ad, bd, ah, bh = t, 0, 0, 0, 0
    nw = triton.cdiv(g.inner, 32)
    n_words = g.outer * nw
    near = max(_before(g.kw), _after(g.kw)) <= 32
    grid = (max(1, triton.cdiv(n_words, _DILATE_BLOCK)),)
    wrap_triton(_dilate_kernel)[grid](
        s, mask, stats, n_words, NW=nw, NWS=nws, NB=g.nb, INNER=g.inner, C=g.C if g.couple else 1,
        D=g.D, H=g.H, W=g.W, AD=ad, BD=bd, AH=ah, BH=bh,
        AW=_before(g.kw), BW=_after(g.kw), CHANNELS=g.channels_last, COUPLED=g.couple, NEAR=near,
        IDX64=_idx64(n_words + _DILATE_BLOCK, len(s) + 1, g.outer * g.nb + 4), BLOCK=_DILATE_BLOCK, num_warps=4)
    return mask, stats


def apply_mask(src: torch.Tensor, out: torch.Tensor, mask: torch.Tensor, stats: torch.Tensor, seed: torch.Tensor,
               g: Geometry, scale: bool, noise: bool) -> None:
    """Launch 3: out = src * keep * scale (src, out dense in g's layout; out may be src)."""
    inner, outer = g.inner, g.outer
    if outer == 0 or inner == 0:
        return
    flat = inner % 8 == 0
    if flat:
        bi, bo = 8, _APPLY_ELEMS // 8
        grid = (triton.cdiv(outer * inner, _APPLY_ELEMS),)
    else:
        bi = max(8, min(triton.next_power_of_2(inner), 256))
        bo = max(1, _APPLY_ELEMS // bi)
        grid = (triton.cdiv(outer, bo), triton.cdiv(inner, bi))
    wrap_triton(_apply_kernel)[grid](
        src, out, mask, stats, seed, outer * inner, outer, inner, g.nb, g.C * g.D * g.H, g.D * g.H,
        SCALE=scale and not noise, NOISE=noise, NOISE_SHARED=noise and g.couple, CHANNELS=g.channels_last,
        RNE_BF16=out.dtype == torch.bfloat16 and _interpreted(), FLAT=flat,
        IDX64=_idx64(src.numel() + _APPLY_ELEMS, outer * g.nb + _APPLY_ELEMS), BO=bo, BI=bi, num_warps=8)


def seeds_from_words(s: torch.Tensor, g: Geometry, ndim: int) -> torch.Tensor:
    """The seed mask (uint8 [N, C or 1, *spatial]) held in seed words from seed_words()."""
    rows, nws = g.seed_grid()
    cs = 1 if g.couple else g.C
    words = s[: rows * nws].to(torch.int64) & 0xFFFFFFFF
    if g.channels_last and g.couple:
        m = (words != 0).reshape(g.N, g.D, g.H, g.W, 1).permute(0, 4, 1, 2, 3)
    else:
        shifts = torch.arange(32, device=s.device, dtype=torch.int64)
        bits = ((words.reshape(rows, nws, 1) >> shifts) & 1).reshape(rows, nws * 32)
        if g.channels_last:
            m = bits[:, : g.C].reshape(g.N, g.D, g.H, g.W, g.C).permute(0, 4, 1, 2, 3)
        else:
            m = bits[:, : g.W].reshape(g.N, cs, g.D, g.H, g.W)
    m = m.to(torch.uint8).contiguous()
    return m.reshape(m.shape[:2] + m.shape[5 - (ndim - 2):])


# ---------------------------------------------------------------- compile check (no GPU needed)

_CHECK_CONFIGS = [
    # shape, block, dtype, couple, valid_only, channels_last, noise, gamma
    ((32, 256, 56, 56), (7, 7), torch.float32, False, False, False, False, 0.003),
    ((32, 256, 56, 56), (7, 7), torch.bfloat16, False, False, True, False, 0.003),
    ((32, 1024, 14, 14), (5, 5), torch.float16, True, False, True, True, 0.2),
    ((32, 1024, 14, 14), (5, 5), torch.float32, True, True, False, False, 1.0),
    ((2, 16, 33, 70), (4, 70), torch.float32, False, False, False, True, 0.01),
    ((2, 16, 33, 100), (3, 5), torch.float64, True, False, False, False, 0.2),
    ((2, 16, 5, 6, 7), (3, 2, 4), torch.float64, False, False, True, False, 0.02),
    ((2, 16, 29), (4,), torch.bfloat16, True, False, False, True, 0.02),
]


def compile_check(arch: int = 90, configs=_CHECK_CONFIGS):
    """Compiles every launch the forward/backward makes for `configs` down to a cubin for sm_`arch`,
    without a GPU and without running anything (see launch_check). Returns [(kernel, config, error)]
    for the failures. Needs TRITON_INTERPRET unset when triton is imported (see the test)."""
    import sys

    from fastnn.triton_kernels import launch_check as lc

    failures = []
    for cfg in configs:
        shape, block, dtype, couple, valid_only, cl, noise, gamma = cfg
        with lc.record_launches(sys.modules[__name__], "wrap_triton") as records:
            x = torch.empty(shape, dtype=dtype, device="meta")
            seed = torch.empty(1, dtype=torch.int64, device="meta")
            g = geometry(shape, block, couple, valid_only, cl)
            mask, stats = build_mask(x, seed, g, gamma)
            apply_mask(x, x, mask, stats, seed, g, True, noise)
            apply_mask(x, x, mask, stats, stats, g, True, False)  # the backward
        if not records:  # a recorder that saw nothing would pass vacuously
            failures.append(("(no launch recorded)", cfg, "the launchers bypassed the recorder"))
        for fn, args, kw in records:
            sig, consts, attrs, opts = lc.launch_signature(fn, args, kw)
            try:
                triton.compile(lc.ast_source(fn, sig, consts, attrs), target=lc.gpu_target(arch), options=opts)
            except Exception as e:  # report all, not just the first
                failures.append((fn.__name__, cfg, lc.error_chain(e)[-2000:]))
    return failures
