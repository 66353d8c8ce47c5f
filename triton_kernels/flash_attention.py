"""FlashAttention-2 forward and backward in Triton.

Layout and assumptions (the launchers below enforce them):
- q: (B, Sq, H, D), k/v: (B, Sk, Hkv, D), any strides as long as the last (head-dim) stride is 1.
  H % Hkv == 0 (GQA/MQA: query head h reads kv head h // (H // Hkv); K/V are never repeated).
- fp16/bf16 (fp32 accumulation, P cast to the input dtype for the PV matmul as FlashAttention does)
  or fp32 (3xTF32 matmuls, close to fp32 accuracy; plain TF32 when torch.backends.cuda.matmul.allow_tf32
  is on). Softmax statistics, dK/dV/dQ accumulators and the log-sum-exp are fp32 throughout.
- D in [1, 256]; the kernels work on HEAD_DIM = next power of two >= max(D, 16) and mask the rest.
  Any Sq, Sk (tails are masked).
- Causal: key j is visible to query i iff j <= i + causal_shift (0 = top-left, Sk - Sq = bottom-right).
  A query row with no visible key gets output 0 (as in flash-attn) and log-sum-exp -inf.
- Dropout: keep(b, h, i, j) = philox_uniform(seed, ((b*H + h)*Sq + i)*Sk + j) >= p, recomputed in the
  backward (never stored). `dropout_mask` runs the same stream for tests.
- The log-sum-exp is natural-log, fp32, (B, H, Sq) contiguous.

The softmax runs in base 2: scores are scaled by softmax_scale*log2(e) so exp2 can be used.
Forward: one program per (query block, batch*head), online softmax over key blocks, unmasked blocks
first; on sm_90+ K/V tiles come through device-side tensor descriptors (TMA) when the strides allow.
Backward: a preprocess kernel (delta = rowsum(dO*O), lse in base 2), a dK/dV kernel (one program per
key block and query head; GQA groups are summed from fp32 partials afterwards) and a dQ kernel, all
recomputing P from the saved log-sum-exp. Deterministic: no atomics.
"""
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

HAS_TENSOR_DESC = hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")


# ----------------------------------------------------------------------------- forward

# Triton's CPU interpreter multiplies bf16 bit patterns as integers in tl.dot; there the bf16
# operands go through fp32 (exact: products of bf16 values with fp32 accumulation, as on the GPU).
_INTERP_BF16_DOT = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr):
    if _INTERP_BF16_DOT:
        if a.dtype == tl.bfloat16:
            out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            out = tl.dot(a, b, acc, input_precision=PREC)
    else:
        out = tl.dot(a, b, acc, input_precision=PREC)
    return out


@triton.jit
def _i64(x):
    # int64 copy of a runtime int that Triton may have specialized to a constant (e.g. a seqlen of 1)
    return x + tl.zeros([], dtype=tl.int64)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_kn, stride_vn,
               lo, hi, offs_m, offs_n, offs_d, seq_k, causal_shift, qk_scale,
               seed, rng_base, dropout_p,
               D: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
               HAS_DROPOUT: tl.constexpr, PREC: tl.constexpr, USE_TMA: tl.constexpr, SCALE_POS: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """Key blocks [lo, hi). MASKED: the blocks may hold keys past seq_k or above the causal diagonal."""
    k_ptrs = k_base + _i64(lo) * stride_kn + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = v_base + _i64(lo) * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :]
    dmask = offs_d[None, :] < D
    for n0 in range(lo, hi, BLOCK_N):
        n0 = tl.multiple_of(n0, BLOCK_N)
        cols = n0 + offs_n
        if USE_TMA:
            k = k_desc.load([n0, 0])
        elif MASKED:
            k = tl.load(k_ptrs, mask=(cols[:, None] < seq_k) & dmask, other=0.0)
        elif D == HEAD_DIM:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=dmask, other=0.0)
        qk = _dot(q, tl.trans(k), None, PREC)
        if MASKED:
            s = qk * qk_scale
            valid = cols[None, :] < seq_k
            if IS_CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None] + causal_shift)
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a row that has seen no key yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_use[:, None])
        elif SCALE_POS:
            # max(qk) * scale = max(qk * scale) for scale > 0; qk * scale - m is then one FMA
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_use = m_new
            p = tl.math.exp2(qk * qk_scale - m_use[:, None])
        else:
            s = qk * qk_scale
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
            p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            rng = rng_base + offs_m[:, None].to(tl.int64) * seq_k + cols[None, :]
            p = tl.where(tl.rand(seed, rng) >= dropout_p, p, 0.0)
        if USE_TMA:
            v = v_desc.load([n0, 0])
        elif MASKED:
            v = tl.load(v_ptrs, mask=(cols[:, None] < seq_k) & dmask, other=0.0)
        elif D == HEAD_DIM:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=dmask, other=0.0)
        acc = _dot(p.to(v.dtype), v, acc, PREC)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, SEED,
                stride_qb, stride_qm, stride_qh,
                stride_kb, stride_kn, stride_kh,
                stride_vb, stride_vn, stride_vh,
                stride_ob, stride_om, stride_oh,
                H, GROUP, seq_q, seq_k, causal_shift, sm_scale, dropout_p,
                SQ_KEY, SK_KEY,  # autotune keys only (bucketed seqlens)
                D: tl.constexpr, HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                PREC: tl.constexpr, USE_TMA: tl.constexpr, SCALE_POS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Inductor (torch.compile) passes Python floats to user kernels as fp64 scalars, Triton's own
    # launcher as fp32: pin them to fp32, or the softmax math and the accumulators turn fp64
    # (and tl.dot rejects the fp64 accumulator)
    sm_scale = tl.cast(sm_scale, tl.float32)
    dropout_p = tl.cast(dropout_p, tl.float32)
    pid_m = tl.program_id(0)
    if IS_CAUSAL:  # the longest rows first: better tail balance
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_q
    dmask = offs_d[None, :] < D
    q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :],
                mask=row_ok[:, None] & dmask, other=0.0)

    if USE_TMA:
        k_desc = tl.make_tensor_descriptor(k_base, shape=[seq_k, D], strides=[stride_kn, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[seq_k, D], strides=[stride_vn, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
    else:
        k_desc = 0
        v_desc = 0

    if HAS_DROPOUT:
        seed = tl.load(SEED)
        rng_base = bh.to(tl.int64) * seq_q * seq_k
    else:
        seed = 0
        rng_base = 0

    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Keys [0, n_full) are visible to every row of this block and inside seq_k: no masks there.
    if IS_CAUSAL:
        hi = tl.minimum(m0 + BLOCK_M + causal_shift, seq_k)
        hi = tl.maximum(hi, 0)
        n_full = tl.maximum(tl.minimum(m0 + causal_shift + 1, seq_k), 0)
    else:
        hi = seq_k
        n_full = seq_k
    n_full = (n_full // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_kn, stride_vn,
                               0, n_full, offs_m, offs_n, offs_d, seq_k, causal_shift, qk_scale,
                               seed, rng_base, dropout_p,
                               D, HEAD_DIM, False, IS_CAUSAL, HAS_DROPOUT, PREC, USE_TMA, SCALE_POS, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_kn, stride_vn,
                               n_full, hi, offs_m, offs_n, offs_d, seq_k, causal_shift, qk_scale,
                               seed, rng_base, dropout_p,
                               D, HEAD_DIM, True, IS_CAUSAL, HAS_DROPOUT, PREC, USE_TMA, SCALE_POS, BLOCK_N)

    empty = l_i == 0.0
    inv_l = 1.0 / tl.where(empty, 1.0, l_i)
    if HAS_DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    acc = acc * inv_l[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    # an infinite logit: the log-sum-exp is +inf (torch.logsumexp), not inf - inf = NaN
    lse = tl.where(m_i == float("inf"), float("inf"), lse)
    tl.store(LSE + bh.to(tl.int64) * seq_q + offs_m, lse, mask=row_ok)
    tl.store(o_base + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=row_ok[:, None] & dmask)


# ----------------------------------------------------------------------------- backward

@triton.jit
def _bwd_preprocess(O, DO, LSE, DLSE, DELTA, LSE2,
                    stride_ob, stride_om, stride_oh, stride_dob, stride_dom, stride_doh,
                    H, seq_q,
                    D: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) (- dlse when the log-sum-exp output has a gradient);
    lse2 = lse * log2(e), with +inf for rows that saw no key (so exp2(s - lse2) = 0)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_q
    mask = row_ok[:, None] & (offs_d[None, :] < D)
    o = tl.load(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                 + offs_m[:, None].to(tl.int64) * stride_dom + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row = bh.to(tl.int64) * seq_q + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + row, mask=row_ok, other=0.0)
    lse = tl.load(LSE + row, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    tl.store(DELTA + row, delta, mask=row_ok)
    tl.store(LSE2 + row, lse2, mask=row_ok)


@triton.jit
def _bwd_kv_inner(dk, dv, k, v, q_base, do_base, L2, DL, stride_qm, stride_dom,
                  lo, hi, offs_n, offs_d, seq_q, seq_k, causal_shift, qk_scale,
                  seed, rng_base, dropout_p, rp,
                  D: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                  PREC: tl.constexpr, BLOCK_M: tl.constexpr):
    """Query blocks [lo, hi) of one head into dK/dV of one key block (all in transposed form:
    rows = keys). MASKED: apply the causal mask. Rows past seq_q load lse2 = +inf, so P = 0 there."""
    offs_mb = tl.arange(0, BLOCK_M)
    dmask = offs_d[None, :] < D
    q_ptrs = q_base + _i64(lo) * stride_qm + offs_mb[:, None] * stride_qm + offs_d[None, :]
    do_ptrs = do_base + _i64(lo) * stride_dom + offs_mb[:, None] * stride_dom + offs_d[None, :]
    for m0 in range(lo, hi, BLOCK_M):
        m0 = tl.multiple_of(m0, BLOCK_M)
        rows = m0 + offs_mb
        rmask = rows < seq_q
        q = tl.load(q_ptrs, mask=rmask[:, None] & dmask, other=0.0)
        l2 = tl.load(L2 + rows, mask=rmask, other=float("inf"))
        qkT = _dot(k, tl.trans(q), None, PREC)
        pT = tl.math.exp2(qkT * qk_scale - l2[None, :])
        if MASKED:
            pT = tl.where(rows[None, :] + causal_shift >= offs_n[:, None], pT, 0.0)
        do = tl.load(do_ptrs, mask=rmask[:, None] & dmask, other=0.0)
        dl = tl.load(DL + rows, mask=rmask, other=0.0)
        dpT = _dot(v, tl.trans(do), None, PREC)
        if HAS_DROPOUT:
            rng = rng_base + rows[None, :].to(tl.int64) * seq_k + offs_n[:, None]
            keep = tl.rand(seed, rng) >= dropout_p
            pdT = tl.where(keep, pT * rp, 0.0)
            dpT = tl.where(keep, dpT * rp, 0.0)
        else:
            pdT = pT
        dv = _dot(pdT.to(do.dtype), do, dv, PREC)
        dsT = pT * (dpT - dl[None, :])
        dk = _dot(dsT.to(q.dtype), q, dk, PREC)
        q_ptrs += BLOCK_M * stride_qm
        do_ptrs += BLOCK_M * stride_dom
    return dk, dv


@triton.jit
def _bwd_kv_kernel(Q, K, V, DO, DK, DV, L2, DL, SEED,
                   stride_qb, stride_qm, stride_qh,
                   stride_kb, stride_kn, stride_kh,
                   stride_vb, stride_vn, stride_vh,
                   stride_dob, stride_dom, stride_doh,
                   stride_dkb, stride_dkn, stride_dkh,
                   stride_dvb, stride_dvn, stride_dvh,
                   H, GROUP, seq_q, seq_k, causal_shift, sm_scale, dropout_p,
                   SQ_KEY, SK_KEY,
                   D: tl.constexpr, HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                   PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK/dV of one key block from one query head h (kv head h // GROUP). DK/DV are indexed by the
    query head: with GQA the launcher passes fp32 per-query-head buffers and sums each group after
    (deterministic, no atomics, K/V never repeated)."""
    sm_scale = tl.cast(sm_scale, tl.float32)  # fp64 under Inductor, see _fwd_kernel
    dropout_p = tl.cast(dropout_p, tl.float32)
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < seq_k
    kv_mask = col_ok[:, None] & (offs_d[None, :] < D)
    k = tl.load(K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
                + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
                + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    if HAS_DROPOUT:
        seed = tl.load(SEED)
        rp = 1.0 / (1.0 - dropout_p)
        rng_base = bh.to(tl.int64) * seq_q * seq_k
    else:
        seed = 0
        rp = 1.0
        rng_base = 0
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    l2_base = L2 + bh.to(tl.int64) * seq_q
    dl_base = DL + bh.to(tl.int64) * seq_q

    # Query rows that see any key of this block: i >= n0 - shift. Rows that see all of them:
    # i >= n0 + BLOCK_N - 1 - shift; below that the causal mask is applied.
    if IS_CAUSAL:
        m_lo = tl.maximum(n0 - causal_shift, 0)
        m_lo = (m_lo // BLOCK_M) * BLOCK_M
        m_mid = tl.maximum(n0 + BLOCK_N - 1 - causal_shift, 0)
        m_mid = tl.cdiv(m_mid, BLOCK_M) * BLOCK_M
        m_mid = tl.minimum(tl.maximum(m_mid, m_lo), tl.cdiv(seq_q, BLOCK_M) * BLOCK_M)
        dk, dv = _bwd_kv_inner(dk, dv, k, v, q_base, do_base, l2_base, dl_base, stride_qm, stride_dom,
                               m_lo, m_mid, offs_n, offs_d, seq_q, seq_k, causal_shift, qk_scale,
                               seed, rng_base, dropout_p, rp,
                               D, HEAD_DIM, True, HAS_DROPOUT, PREC, BLOCK_M)
    else:
        m_mid = 0
    dk, dv = _bwd_kv_inner(dk, dv, k, v, q_base, do_base, l2_base, dl_base, stride_qm, stride_dom,
                           m_mid, seq_q, offs_n, offs_d, seq_q, seq_k, causal_shift, qk_scale,
                           seed, rng_base, dropout_p, rp,
                           D, HEAD_DIM, False, HAS_DROPOUT, PREC, BLOCK_M)
    dk = dk * sm_scale
    tl.store(DK + b.to(tl.int64) * stride_dkb + h.to(tl.int64) * stride_dkh
             + offs_n[:, None].to(tl.int64) * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b.to(tl.int64) * stride_dvb + h.to(tl.int64) * stride_dvh
             + offs_n[:, None].to(tl.int64) * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_q_inner(dq, q, do, l2, dl, k_base, v_base, stride_kn, stride_vn,
                 lo, hi, rows, offs_d, seq_k, causal_shift, qk_scale,
                 seed, rng_base, dropout_p, rp,
                 D: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
                 HAS_DROPOUT: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks [lo, hi) into dQ of one query block. MASKED: keys past seq_k (their K = 0 would
    still meet a possibly huge exp2(-lse2)) or above the causal diagonal."""
    offs_nb = tl.arange(0, BLOCK_N)
    dmask = offs_d[None, :] < D
    k_ptrs = k_base + _i64(lo) * stride_kn + offs_nb[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = v_base + _i64(lo) * stride_vn + offs_nb[:, None] * stride_vn + offs_d[None, :]
    for n0 in range(lo, hi, BLOCK_N):
        n0 = tl.multiple_of(n0, BLOCK_N)
        cols = n0 + offs_nb
        if MASKED:
            kmask = (cols[:, None] < seq_k) & dmask
        else:
            kmask = dmask
        k = tl.load(k_ptrs, mask=kmask, other=0.0)
        v = tl.load(v_ptrs, mask=kmask, other=0.0)
        qk = _dot(q, tl.trans(k), None, PREC)
        p = tl.math.exp2(qk * qk_scale - l2[:, None])
        if MASKED:
            valid = cols[None, :] < seq_k
            if IS_CAUSAL:
                valid = valid & (cols[None, :] <= rows[:, None] + causal_shift)
            p = tl.where(valid, p, 0.0)
        dp = _dot(do, tl.trans(v), None, PREC)
        if HAS_DROPOUT:
            rng = rng_base + rows[:, None].to(tl.int64) * seq_k + cols[None, :]
            dp = tl.where(tl.rand(seed, rng) >= dropout_p, dp * rp, 0.0)
        ds = p * (dp - dl[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, PREC)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return dq


@triton.jit
def _bwd_q_kernel(Q, K, V, DO, DQ, L2, DL, SEED,
                  stride_qb, stride_qm, stride_qh,
                  stride_kb, stride_kn, stride_kh,
                  stride_vb, stride_vn, stride_vh,
                  stride_dob, stride_dom, stride_doh,
                  stride_dqb, stride_dqm, stride_dqh,
                  H, GROUP, seq_q, seq_k, causal_shift, sm_scale, dropout_p,
                  SQ_KEY, SK_KEY,
                  D: tl.constexpr, HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                  PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    sm_scale = tl.cast(sm_scale, tl.float32)  # fp64 under Inductor, see _fwd_kernel
    dropout_p = tl.cast(dropout_p, tl.float32)
    pid_m = tl.program_id(0)
    if IS_CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < seq_q
    mask = row_ok[:, None] & (offs_d[None, :] < D)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                + rows[:, None].to(tl.int64) * stride_qm + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                 + rows[:, None].to(tl.int64) * stride_dom + offs_d[None, :], mask=mask, other=0.0)
    l2 = tl.load(L2 + bh.to(tl.int64) * seq_q + rows, mask=row_ok, other=float("inf"))
    dl = tl.load(DL + bh.to(tl.int64) * seq_q + rows, mask=row_ok, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    qk_scale = sm_scale * 1.4426950408889634
    if HAS_DROPOUT:
        seed = tl.load(SEED)
        rp = 1.0 / (1.0 - dropout_p)
        rng_base = bh.to(tl.int64) * seq_q * seq_k
    else:
        seed = 0
        rp = 1.0
        rng_base = 0
    if IS_CAUSAL:
        hi = tl.maximum(tl.minimum(m0 + BLOCK_M + causal_shift, seq_k), 0)
        n_full = tl.maximum(tl.minimum(m0 + causal_shift + 1, seq_k), 0)
    else:
        hi = seq_k
        n_full = seq_k
    n_full = (n_full // BLOCK_N) * BLOCK_N
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _bwd_q_inner(dq, q, do, l2, dl, k_base, v_base, stride_kn, stride_vn,
                      0, n_full, rows, offs_d, seq_k, causal_shift, qk_scale, seed, rng_base, dropout_p, rp,
                      D, HEAD_DIM, False, IS_CAUSAL, HAS_DROPOUT, PREC, BLOCK_N)
    dq = _bwd_q_inner(dq, q, do, l2, dl, k_base, v_base, stride_kn, stride_vn,
                      n_full, hi, rows, offs_d, seq_k, causal_shift, qk_scale, seed, rng_base, dropout_p, rp,
                      D, HEAD_DIM, True, IS_CAUSAL, HAS_DROPOUT, PREC, BLOCK_N)
    dq = dq * sm_scale
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
             + rows[:, None].to(tl.int64) * stride_dqm + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=mask)


@triton.jit
def _dropout_mask_kernel(OUT, SEED, seq_q, seq_k, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keep-mask the attention kernels use, as int8 (B*H, Sq, Sk). For tests."""
    dropout_p = tl.cast(dropout_p, tl.float32)  # the same fp32 threshold as the attention kernels
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    bh = tl.program_id(2)
    seed = tl.load(SEED)
    rng = bh.to(tl.int64) * seq_q * seq_k + rows[:, None].to(tl.int64) * seq_k + cols[None, :]
    keep = tl.rand(seed, rng) >= dropout_p
    tl.store(OUT + rng, keep.to(tl.int8), mask=(rows[:, None] < seq_q) & (cols[None, :] < seq_k))


# ----------------------------------------------------------------------------- configs

def _pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


def head_dim_padded(d: int) -> int:
    return max(16, _pow2(d))


def _bucket(s: int) -> int:
    """Autotune key for a sequence length: the next power of two (>= 64)."""
    return max(64, _pow2(s))


# (BLOCK_M, BLOCK_N, num_warps, num_stages); the first entry of each list is also the
# untuned default (FASTNN_FA_AUTOTUNE=0 and the tests). Classes by dtype and padded head dim.
# Measured on an H100 (bf16, B*S = 16k, benchmarks/tune_flash_attention.py): the first entry of
# each 16-bit list was the best or within a few % there, the rest are the next best candidates.
FWD_CONFIGS = {
    "h64": [(128, 64, 8, 3), (64, 128, 4, 2), (128, 64, 4, 3), (64, 64, 4, 3)],
    "h128": [(64, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 2)],
    "h256": [(64, 32, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2)],
    "f32": [(32, 32, 4, 2), (64, 32, 8, 2)],
    "f32h256": [(16, 32, 4, 1), (32, 32, 8, 1)],
}
BWD_KV_CONFIGS = {  # BLOCK_M = query rows per step, BLOCK_N = keys per program
    "h64": [(64, 64, 4, 2), (32, 64, 4, 3), (32, 64, 4, 2), (64, 128, 8, 2)],
    "h128": [(64, 64, 4, 2), (32, 64, 4, 3), (64, 128, 8, 2), (32, 128, 8, 3)],
    "h256": [(32, 32, 8, 1), (16, 32, 4, 1), (32, 32, 4, 1)],
    "f32": [(16, 32, 8, 1), (16, 32, 4, 1)],
    "f32h256": [(16, 16, 8, 1), (16, 16, 4, 1)],
}
BWD_Q_CONFIGS = {  # BLOCK_M = query rows per program, BLOCK_N = keys per step
    "h64": [(64, 64, 4, 2), (64, 32, 4, 3), (128, 64, 8, 3), (128, 32, 8, 2)],
    "h128": [(64, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 2), (128, 64, 8, 2)],
    "h256": [(64, 32, 8, 2), (32, 32, 8, 1), (32, 32, 4, 1)],
    "f32": [(32, 32, 4, 1), (64, 32, 8, 1)],
    "f32h256": [(16, 16, 4, 1)],
}
# the interpreter runs block ops with numpy: fewer, larger blocks are faster, and no tuning
_INTERP_BLOCK = 32


def _cls(dtype, hd: int) -> str:
    if dtype == torch.float32:
        return "f32h256" if hd > 128 else "f32"
    return "h64" if hd <= 64 else ("h128" if hd <= 128 else "h256")


def _autotune_key():
    return ["SQ_KEY", "SK_KEY", "HEAD_DIM", "IS_CAUSAL", "HAS_DROPOUT", "PREC"]


def _tuned(kernel, table, extra_key=()):
    return {c: triton.autotune([triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                                for m, n, w, s in cfgs], key=_autotune_key() + list(extra_key))(kernel)
            for c, cfgs in table.items()}


_FWD_TUNED = _tuned(_fwd_kernel, FWD_CONFIGS, ("USE_TMA",))
_BWD_KV_TUNED = _tuned(_bwd_kv_kernel, BWD_KV_CONFIGS)
_BWD_Q_TUNED = _tuned(_bwd_q_kernel, BWD_Q_CONFIGS)


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def autotune_enabled() -> bool:
    return not interpreted() and os.environ.get("FASTNN_FA_AUTOTUNE", "1") != "0"


# Hopper+ tensor-descriptor (TMA) loads of K/V in the forward; "0" turns them off, "1" forces them.
def _tma_setting() -> str:
    return os.environ.get("FASTNN_FA_TMA", "auto")


_allocator_set = False


def _ensure_allocator():
    # device-side tensor descriptors need a scratch buffer from Triton's allocator
    global _allocator_set
    if not _allocator_set:
        def alloc(size: int, alignment: int, stream):
            return torch.empty(size, device="cuda", dtype=torch.int8)
        triton.set_allocator(alloc)
        _allocator_set = True


_CAPS = {}


def _capability(device):
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _CAPS:
        _CAPS[idx] = torch.cuda.get_device_capability(idx)
    return _CAPS[idx]


def _tma_ok(dtype, hd: int, *ts) -> bool:
    """TMA needs a 16-byte aligned base and 16-byte multiple row strides (checked per tensor;
    the per-(batch, head) offsets are multiples of those strides)."""
    setting = _tma_setting()
    if setting == "0" or not HAS_TENSOR_DESC or interpreted() or dtype == torch.float32:
        return False
    from torch._subclasses.fake_tensor import is_fake
    if any(is_fake(t) for t in ts):
        # traced by torch.compile: the generated launcher may not provide the scratch allocation
        # device-side descriptors need, so compiled graphs use the pointer loads
        return False
    if not all(t.is_cuda for t in ts) or _capability(ts[0].device)[0] < 9:
        return False
    for t in ts:
        es = t.element_size()
        if t.shape[1] == 0 or t.data_ptr() % 16 or any((st * es) % 16 for st in t.stride()[:-1]):
            return False
    return setting == "1" or hd <= 128


def _precision(dtype) -> str:
    """fp32 inputs follow torch's matmul setting: plain TF32 tensor-core matmuls when
    torch.backends.cuda.matmul.allow_tf32 is on, else 3xTF32 (split-precision, close to fp32
    accuracy; Triton's "ieee" fp32 dot runs on FMA units and spills heavily). fp16/bf16 ignore it."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "tf32x3"
    return "tf32"


def _fixed(table_entry, sq_rows: int, sk_cols: int):
    bm, bn, w, s = table_entry
    if interpreted():
        bm = bn = _INTERP_BLOCK
        w, s = 4, 1
    # tiny sequences: smaller tiles (tl.dot needs >= 16)
    bm = min(bm, max(16, _pow2(sq_rows)))
    bn = min(bn, max(16, _pow2(sk_cols)))
    return bm, bn, w, s


def _wrap(kernel):
    # torch.library.wrap_triton, looked up per call (compile_check swaps this function out)
    from torch.library import wrap_triton
    return wrap_triton(kernel)


def _launch(kernel, tuned, grid_of, args, consts, config):
    """Run `kernel` with `config` (BLOCK_M, BLOCK_N, warps, stages) or through its autotuner."""
    if config is None:
        return _wrap(tuned)[lambda meta: grid_of(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **consts)
    bm, bn, w, s = config
    return _wrap(kernel)[grid_of(bm, bn)](*args, **consts, BLOCK_M=bm, BLOCK_N=bn,
                                                  num_warps=w, num_stages=s)


def _strides3(t):
    # (B, S, H, D) tensor -> (batch, seq, head) strides; the head-dim stride is 1
    return t.stride(0), t.stride(1), t.stride(2)


def forward(q, k, v, *, softmax_scale: float, causal: bool, causal_shift: int = 0,
            dropout_p: float = 0.0, seed=None, config=None, use_tma=None):
    """out (B, Sq, H, D) in q's dtype, lse (B, H, Sq) fp32. See the module docstring for the layout."""
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    hd = head_dim_padded(D)
    out = torch.empty((B, Sq, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    if B * H * Sq == 0:
        return out, lse
    tma = _tma_ok(q.dtype, hd, k, v) if use_tma is None else bool(use_tma)
    if tma:
        _ensure_allocator()
    has_drop = dropout_p > 0.0
    args = (q, k, v, out, lse, seed if has_drop else lse,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out),
            H, H // Hkv, Sq, Sk, int(causal_shift) if causal else 0, float(softmax_scale), float(dropout_p),
            _bucket(Sq), _bucket(Sk))
    consts = dict(D=D, HEAD_DIM=hd, IS_CAUSAL=bool(causal), HAS_DROPOUT=has_drop, PREC=_precision(q.dtype),
                  USE_TMA=tma, SCALE_POS=float(softmax_scale) > 0.0)
    cls = _cls(q.dtype, hd)
    if config is None and not autotune_enabled():
        config = _fixed(FWD_CONFIGS[cls][0], Sq, Sk)
    _launch(_fwd_kernel, _FWD_TUNED[cls], lambda bm, bn: (triton.cdiv(Sq, bm), B * H), args, consts, config)
    return out, lse


def backward(do, q, k, v, out, lse, dlse=None, *, softmax_scale: float, causal: bool, causal_shift: int = 0,
             dropout_p: float = 0.0, seed=None, config_kv=None, config_q=None):
    """dq, dk, dv (contiguous, (B, S, H, D) layout) from the saved out and lse."""
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    hd = head_dim_padded(D)
    dq = torch.empty((B, Sq, H, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Sk, Hkv, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, Sk, Hkv, D), dtype=v.dtype, device=v.device)
    if B * H * Sq == 0 or Sk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    group = H // Hkv
    # GQA: per-query-head fp32 partials, summed per group below
    dk_h = dk if group == 1 else torch.empty((B, Sk, H, D), dtype=torch.float32, device=k.device)
    dv_h = dv if group == 1 else torch.empty((B, Sk, H, D), dtype=torch.float32, device=v.device)
    delta = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    lse2 = torch.empty_like(delta)
    bm_pre = 32 if interpreted() else max(16, min(128, 8192 // hd))
    _wrap(_bwd_preprocess)[(triton.cdiv(Sq, bm_pre), B * H)](
        out, do, lse, dlse if dlse is not None else lse, delta, lse2,
        *_strides3(out), *_strides3(do), H, Sq,
        D=D, HEAD_DIM=hd, HAS_DLSE=dlse is not None, BLOCK_M=bm_pre)
    has_drop = dropout_p > 0.0
    shift = int(causal_shift) if causal else 0
    common = dict(D=D, HEAD_DIM=hd, IS_CAUSAL=bool(causal), HAS_DROPOUT=has_drop, PREC=_precision(q.dtype))
    cls = _cls(q.dtype, hd)
    seed_arg = seed if has_drop else lse
    if config_kv is None and not autotune_enabled():
        config_kv = _fixed(BWD_KV_CONFIGS[cls][0], Sq, Sk)
    if config_q is None and not autotune_enabled():
        config_q = _fixed(BWD_Q_CONFIGS[cls][0], Sq, Sk)
    _launch(_bwd_kv_kernel, _BWD_KV_TUNED[cls], lambda bm, bn: (triton.cdiv(Sk, bn), B * H),
            (q, k, v, do, dk_h, dv_h, lse2, delta, seed_arg,
             *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dk_h), *_strides3(dv_h),
             H, group, Sq, Sk, shift, float(softmax_scale), float(dropout_p), _bucket(Sq), _bucket(Sk)),
            common, config_kv)
    _launch(_bwd_q_kernel, _BWD_Q_TUNED[cls], lambda bm, bn: (triton.cdiv(Sq, bm), B * H),
            (q, k, v, do, dq, lse2, delta, seed_arg,
             *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dq),
             H, H // Hkv, Sq, Sk, shift, float(softmax_scale), float(dropout_p), _bucket(Sq), _bucket(Sk)),
            common, config_q)
    if group > 1:
        dk.copy_(dk_h.view(B, Sk, Hkv, group, D).sum(3))
        dv.copy_(dv_h.view(B, Sk, Hkv, group, D).sum(3))
    return dq, dk, dv


def dropout_mask(seed, batch: int, nheads: int, seqlen_q: int, seqlen_k: int, dropout_p: float):
    """The keep-mask (bool, (B, H, Sq, Sk)) that a call with this seed tensor and dropout_p uses."""
    out = torch.empty((batch, nheads, seqlen_q, seqlen_k), dtype=torch.int8, device=seed.device)
    if out.numel():
        bm = bn = 32
        _dropout_mask_kernel[(triton.cdiv(seqlen_q, bm), triton.cdiv(seqlen_k, bn), batch * nheads)](
            out, seed, seqlen_q, seqlen_k, float(dropout_p), BLOCK_M=bm, BLOCK_N=bn)
    return out.bool()


# ----------------------------------------------------------------------------- compile check (no GPU needed)

# (dtype, B, Sq, Sk, H, Hkv, D, causal, dropout_p): the 16-bit forward with and without TMA-free
# pointer loads, GQA, masked tails, dropout, fp32 (3xTF32), a head dim that is padded
_CHECK_CASES = [
    (torch.bfloat16, 2, 257, 300, 4, 2, 64, True, 0.0),
    (torch.float16, 2, 128, 77, 4, 4, 96, False, 0.1),
    (torch.float32, 1, 64, 64, 2, 1, 32, True, 0.1),
]


def _ttir(src, target, opts: dict) -> str:
    """The Triton IR of an ASTSource (the front end only: no lowering, no ptxas)."""
    import inspect
    from triton.compiler.compiler import make_backend
    backend = make_backend(target)
    options = backend.parse_options(opts)
    ctx = triton._C.libtriton.ir.context()
    triton._C.libtriton.ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    args = (options, backend.get_codegen_implementation(options), backend.get_module_map(), ctx)
    if "target" in inspect.signature(src.make_ir).parameters:  # triton >= 3.5
        args = (target,) + args
    return str(src.make_ir(*args))


def compile_check(arch: int = 90, cases=_CHECK_CASES):
    """Compiles every launch forward/backward make for `cases` for sm_`arch`, without a GPU and
    without running anything: the launchers run on meta tensors and record their launches (the
    untuned first config of each table), each compiled with the specialization a real launch gets
    (aligned pointers, ints divisible by 16, ints equal to 1 as constants). Twice: with Python floats
    typed fp32 as Triton's own launcher does, down to a cubin; and typed fp64 as Inductor does for
    user kernels under torch.compile, to Triton IR, which must then hold no fp64 arithmetic (only the
    casts of the arguments). Returns [(kernel, case, float type, error)] for the failures.
    Needs TRITON_INTERPRET unset when triton is imported (see the test)."""
    import sys

    from fastnn.triton_kernels import launch_check as lc

    target = lc.gpu_target(arch)
    failures = []
    for case in cases:
        dtype, b, sq, sk, h, hkv, d, causal, p = case
        with lc.record_launches(sys.modules[__name__], "_wrap") as records:
            q = torch.empty((b, sq, h, d), dtype=dtype, device="meta")
            k = torch.empty((b, sk, hkv, d), dtype=dtype, device="meta")
            seed = torch.empty(1, dtype=torch.int64, device="meta")
            cls = _cls(dtype, head_dim_padded(d))
            out, lse = forward(q, k, k, softmax_scale=d ** -0.5, causal=causal, causal_shift=sk - sq,
                               dropout_p=p, seed=seed, config=FWD_CONFIGS[cls][0], use_tma=False)
            backward(out, q, k, k, out, lse, lse, softmax_scale=d ** -0.5, causal=causal, causal_shift=sk - sq,
                     dropout_p=p, seed=seed, config_kv=BWD_KV_CONFIGS[cls][0], config_q=BWD_Q_CONFIGS[cls][0])
        if not records:  # a recorder that saw nothing would pass vacuously
            failures.append(("(no launch recorded)", case, "-", "the launchers bypassed the recorder"))
        for fn, args, kw in records:
            for ftype in ("fp32", "fp64"):
                sig, consts, attrs, opts = lc.launch_signature(fn, args, kw, ftype)
                if ftype == "fp64" and "fp64" not in sig.values():
                    continue
                try:
                    src = lc.ast_source(fn, sig, consts, attrs)
                    if ftype == "fp32":
                        triton.compile(src, target=target, options=opts)
                    else:
                        ir = _ttir(src, target, opts)
                        f64 = [ln.strip() for ln in ir.splitlines()
                               if "f64" in ln and "tt.func" not in ln and "arith.truncf" not in ln]
                        if f64:
                            raise AssertionError("fp64 arithmetic: " + "\n".join(f64[:5]))
                except Exception as e:  # report all, not just the first
                    failures.append((fn.__name__, case, ftype, lc.error_chain(e)[-4000:]))
    return failures
