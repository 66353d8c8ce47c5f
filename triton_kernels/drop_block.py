"""DropBlock Triton kernels (the GPU path; also runs on CPU tensors under TRITON_INTERPRET=1).

Memory is walked as a dense (outer, inner) matrix, the same for every kernel:
  contiguous (N, C, *spatial):  outer = N*C*D*H, inner = W
  channels-last contiguous:     outer = N*D*H*W, inner = C
(1-D inputs have D = H = 1, 2-D ones D = 1.) The keep mask is bit-packed along `inner`:
uint8 [outer, ceil(inner / 8)], bit j of byte b = unit 8b + j, 1 = kept: about 1 bit per unit,
and the same format as the CPU kernels (csrc/drop_block).

Forward = three launches:
  1. _seed_words_kernel: Bernoulli(gamma) seeds from Philox (tl.randint4x, one 32-bit draw per
     seed position, keyed by a seed drawn from torch's generator), packed 32 to a word along
     the bit axis of the layout. Also resets the drop counter.
  2. _dilate_kernel: each 32-unit output word ORs the seed words in its block window (bit
     shifts along `inner` for the contiguous layout, word loads along the spatial axes),
     stores the keep bits, and adds its dropped count to a global counter.
  3. _apply_kernel: out = x * keep * scale, scale = units / (units - dropped + 1e-7) read from
     the counter on the device (no host sync). The backward is this kernel on the gradient.
Launches 1-2 touch ~N/8 bytes each; launch 3 moves the tensor once in and once out.
"""
import os
from typing import NamedTuple, Sequence

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

_SEED_WORDS_BLOCK = 128  # words (x32 seed positions) per program
_DILATE_BLOCK = 256      # output words per program
_APPLY_ELEMS = 4096      # elements per apply program


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


@triton.jit(do_not_specialize=["thr_bits"])
def _seed_words_kernel(seed_ptr, s_ptr, stats_ptr, n_words, NWS, units, D, H, W,
                       lo_d, hi_d, lo_h, hi_h, lo_w, hi_w, col_lo, col_hi, thr_bits,
                       ALL: tl.constexpr, CHANNELS: tl.constexpr, COUPLED: tl.constexpr,
                       IDX64: tl.constexpr, BLOCK: tl.constexpr):
    # s_ptr: int32 [n_words] = [rows, NWS] seed words (see Geometry.seed_grid); bit j of word
    # (r, ws) is position 32*ws + j along W (contiguous) or C (channels-last, uncoupled); for
    # channels-last coupled, a word is all ones or zero (one draw per (n, d, h, w)).
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
        row_ok = inb & (w >= lo_w) & (w <= hi_w)
    else:
        h = r % H
        d = (r // H) % D
        row_ok = inb
    row_ok = row_ok & (d >= lo_d) & (d <= hi_d) & (h >= lo_h) & (h <= hi_h)
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
        k = tl.arange(0, 8)
        ctr = widx[:, None] * 8 + k[None, :]  # 8 Philox calls x 4 outputs = 32 positions
        col = ws[:, None] * 32 + k[None, :] * 4
        sh = (k * 4).to(tl.uint32)[None, :]
        ok = row_ok[:, None]
        if ALL:
            h0 = ok & (col >= col_lo) & (col <= col_hi)
            h1 = ok & (col + 1 >= col_lo) & (col + 1 <= col_hi)
            h2 = ok & (col + 2 >= col_lo) & (col + 2 <= col_hi)
            h3 = ok & (col + 3 >= col_lo) & (col + 3 <= col_hi)
        else:
            c0, c1, c2, c3 = tl.randint4x(seed, ctr)
            h0 = ok & (c0 < thr) & (col >= col_lo) & (col <= col_hi)
            h1 = ok & (c1 < thr) & (col + 1 >= col_lo) & (col + 1 <= col_hi)
            h2 = ok & (c2 < thr) & (col + 2 >= col_lo) & (col + 2 <= col_hi)
            h3 = ok & (c3 < thr) & (col + 3 >= col_lo) & (col + 3 <= col_hi)
        bits = ((h0.to(tl.uint32) << sh) | (h1.to(tl.uint32) << (sh + 1))
                | (h2.to(tl.uint32) << (sh + 2)) | (h3.to(tl.uint32) << (sh + 3)))
        word = tl.reduce(bits, 1, _or)
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
def _dilate_kernel(s_ptr, mask_ptr, stats_ptr, n_words, NW, NWS, NB, INNER, C, D, H, W,
                   ad, bd, ah, bh, aw, bw,
                   CHANNELS: tl.constexpr, COUPLED: tl.constexpr, NEAR: tl.constexpr,
                   IDX64: tl.constexpr, BLOCK: tl.constexpr):
    # Output word (r, wo): units 32*wo .. 32*wo + 31 of memory row r. Unit i (per axis) is
    # dropped when a seed lies in [i - a, i + b] (a = (k - 1) // 2, b = k // 2).
    # NEAR: the W-reach max(aw, bw) <= 32, so only the seed words wo - 1, wo, wo + 1 matter.
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
        for dd in range(0, ad + bd + 1):
            d2 = d + dd - ad
            okd = inb & (d2 >= 0) & (d2 < D)
            for dh in range(0, ah + bh + 1):
                h2 = h + dh - ah
                okh = okd & (h2 >= 0) & (h2 < H)
                for dw in range(0, aw + bw + 1):
                    w2 = w + dw - aw
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
            for dd in range(0, ad + bd + 1):
                d2 = d + dd - ad
                okd = (d2 >= 0) & (d2 < D)
                for dh in range(0, ah + bh + 1):
                    h2 = h + dh - ah
                    m = okd & (h2 >= 0) & (h2 < H)
                    p = s_ptr + ((ps * D + d2) * H + h2) * NWS + wo
                    v0 = v0 | _load_word(p, m & inb)
                    vm = vm | _load_word(p - 1, m & okm)
                    vp = vp | _load_word(p + 1, m & okp)
            x = v0.to(tl.uint64) | (vp.to(tl.uint64) << 32)  # units 32*wo .. 32*wo + 63
            y = vm.to(tl.uint64) | (v0.to(tl.uint64) << 32)  # units 32*wo - 32 .. 32*wo + 31
            acc = tl.zeros([BLOCK], tl.uint64)
            for e in range(0, bw + 1):  # seed at unit i + e
                acc = acc | (x >> e)
            for e in range(1, aw + 1):  # seed at unit i - e
                acc = acc | (y >> (32 - e))
            drop = (acc & 0xFFFFFFFF).to(tl.uint32)
        else:
            # any reach (slow, rare: kw > 65): unit i + e, e = eo - 32*qoff, is bit rr of
            # word wo + q with eo = 32*(q + qoff) + rr
            qoff = (aw + 31) // 32
            acc = tl.zeros([BLOCK], tl.uint64)
            for e0 in range(0, aw + bw + 1):
                eo = e0 - aw + 32 * qoff
                q = eo // 32 - qoff
                rr = eo % 32
                lo = tl.zeros([BLOCK], tl.uint32)
                hi = tl.zeros([BLOCK], tl.uint32)
                oklo = inb & (wo + q >= 0) & (wo + q < NWS)
                okhi = inb & (wo + q + 1 >= 0) & (wo + q + 1 < NWS)
                for dd in range(0, ad + bd + 1):
                    d2 = d + dd - ad
                    okd = (d2 >= 0) & (d2 < D)
                    for dh in range(0, ah + bh + 1):
                        h2 = h + dh - ah
                        m = okd & (h2 >= 0) & (h2 < H)
                        p = s_ptr + ((ps * D + d2) * H + h2) * NWS + wo + q
                        lo = lo | _load_word(p, m & oklo)
                        hi = hi | _load_word(p + 1, m & okhi)
                acc = acc | ((lo.to(tl.uint64) | (hi.to(tl.uint64) << 32)) >> rr)
            drop = (acc & 0xFFFFFFFF).to(tl.uint32)
    nvalid = tl.minimum(INNER - wo * 32, 32).to(tl.uint64)
    valid = ((tl.full([BLOCK], 1, tl.uint64) << nvalid) - 1).to(tl.uint32)
    valid = tl.where(inb, valid, 0)
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
def _apply_kernel(x_ptr, out_ptr, mask_ptr, stats_ptr, seed_ptr, OUTER, INNER, NB, CDH, DH,
                  SCALE: tl.constexpr, NOISE: tl.constexpr, NOISE_SHARED: tl.constexpr, CHANNELS: tl.constexpr,
                  RNE_BF16: tl.constexpr, IDX64: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr):
    # x, out: dense [OUTER, INNER] (out may be x). out = x * keep * scale; with NOISE,
    # out = x * keep + N(0, 1) * (1 - keep), unscaled (timm's with_noise). NOISE_SHARED: coupled
    # channels share the noise (timm draws it with the mask's shape): keyed by (n, d, h, w).
    po = tl.program_id(0)
    pi = tl.program_id(1)
    if IDX64:
        o = po.to(tl.int64) * BO + tl.arange(0, BO)
    else:
        o = po * BO + tl.arange(0, BO)
    i = pi * BI + tl.arange(0, BI)
    ok = (o < OUTER)[:, None] & (i < INNER)[None, :]
    offs = o[:, None] * INNER + i[None, :]
    x = tl.load(x_ptr + offs, mask=ok, other=0)
    byte = tl.load(mask_ptr + o[:, None] * NB + (i >> 3)[None, :], mask=ok, other=0)
    keep = ((byte >> (i & 7).to(tl.uint8)[None, :]) & 1) != 0
    if x.dtype == tl.float64:
        xf = x
    else:
        xf = x.to(tl.float32)
    if NOISE:
        seed = tl.load(seed_ptr)
        if NOISE_SHARED:
            if CHANNELS:  # row o is the (n, d, h, w) unit
                noffs = o[:, None] + i[None, :] * 0
            else:  # row o = (n*C + c)*D*H + dh -> (n*D*H + dh)*W + i
                noffs = ((o // CDH) * DH + o % DH)[:, None] * INNER + i[None, :]
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
    grid = (max(1, triton.cdiv(n_words, _SEED_WORDS_BLOCK)),)
    wrap_triton(_seed_words_kernel)[grid](
        seed, s, stats, n_words, nws, g.units, g.D, g.H, g.W, lo_d, hi_d, lo_h, hi_h, lo_w, hi_w,
        col_lo, col_hi, thr, ALL=all_, CHANNELS=g.channels_last, COUPLED=g.couple,
        IDX64=_idx64(n_words * 8 + 8), BLOCK=_SEED_WORDS_BLOCK, num_warps=4)
    return s


def build_mask(x: torch.Tensor, seed: torch.Tensor, g: Geometry, gamma: float):
    """Launches 1-2: (mask uint8 [outer, nb], stats int64 [2] = (dropped, units))."""
    stats = torch.empty(2, dtype=torch.int64, device=x.device)
    mask = torch.empty((g.outer, g.nb), dtype=torch.uint8, device=x.device)
    s = seed_words(x, seed, g, gamma, stats)
    _, nws = g.seed_grid()
    nw = triton.cdiv(g.inner, 32)
    n_words = g.outer * nw
    near = max(_before(g.kw), _after(g.kw)) <= 32
    grid = (max(1, triton.cdiv(n_words, _DILATE_BLOCK)),)
    wrap_triton(_dilate_kernel)[grid](
        s, mask, stats, n_words, nw, nws, g.nb, g.inner, g.C, g.D, g.H, g.W,
        _before(g.kd), _after(g.kd), _before(g.kh), _after(g.kh), _before(g.kw), _after(g.kw),
        CHANNELS=g.channels_last, COUPLED=g.couple, NEAR=near,
        IDX64=_idx64(n_words + _DILATE_BLOCK, len(s) + 1, g.outer * g.nb + 4), BLOCK=_DILATE_BLOCK, num_warps=4)
    return mask, stats


def apply_mask(src: torch.Tensor, out: torch.Tensor, mask: torch.Tensor, stats: torch.Tensor, seed: torch.Tensor,
               g: Geometry, scale: bool, noise: bool) -> None:
    """Launch 3: out = src * keep * scale (src, out dense in g's layout; out may be src)."""
    inner, outer = g.inner, g.outer
    bi = min(triton.next_power_of_2(max(inner, 1)), 256)
    bo = max(1, _APPLY_ELEMS // bi)
    grid = (triton.cdiv(outer, bo), triton.cdiv(inner, bi))
    if outer == 0 or inner == 0:
        return
    wrap_triton(_apply_kernel)[grid](
        src, out, mask, stats, seed, outer, inner, g.nb, g.C * g.D * g.H, g.D * g.H, SCALE=scale and not noise,
        NOISE=noise, NOISE_SHARED=noise and g.couple, CHANNELS=g.channels_last,
        RNE_BF16=out.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1", IDX64=_idx64(src.numel() + _APPLY_ELEMS, outer * g.nb + _APPLY_ELEMS), BO=bo, BI=bi, num_warps=8)


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
