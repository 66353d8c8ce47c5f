#pragma once
// CBAM per-element math shared by the CPU and CUDA kernels.
//
// Notation (one sample): x[c, p] with c < C channels and p < P = H*W pixels.
//   channel gate  g[c]  = sigmoid(MLP(mean_p x) + MLP(max_p x))      (computed with ATen ops)
//   spatial pool  a[p]  = mean_c x[c,p]*g[c],  m[p] = max_c x[c,p]*g[c]
//   spatial gate  s[p]  = sigmoid(BN(conv([a, m])))                   (computed with ATen ops)
//   out[c, p]           = (x[c,p]*g[c]) * s[p]
//
// Max and its gradient on ties ("tie mode"):
//   FIRST: the gradient of a max goes to the first maximal element in scan order (p = h*W + w for
//          the pool over H*W, channel order for the pool over C). This is what the tutorial's
//          AdaptiveMaxPool2d / max_pool2d and torch.max(x, 1) do (they return one index).
//   SPLIT: the gradient is split evenly among all maximal elements. This is what torch.amax does
//          (timm's CbamModule).
// The forward pass records, per max, the first index (FIRST) or the number of ties (SPLIT);
// the backward recomputes the compared value bit for bit (x, or x*g in the accumulation type) to
// find the tied elements. NaN: a NaN anywhere in a pooled window makes its mean NaN and the max is
// reported as NaN too (as torch does); the recorded index is then 0 and the count 1.
#include <cmath>
#include <cstdint>
#include <limits>

#include "common/host_device.h"

namespace fastnn {
namespace cbam {

// Running max with its first index and its tie count. Elements must be fed in increasing index
// order to `update`; `combine` merges two states over disjoint index ranges in any order.
template <typename acc_t>
struct MaxState {
  acc_t m;
  int32_t idx;
  int32_t cnt;

  FASTNN_HD void init() {
    m = -std::numeric_limits<acc_t>::infinity();
    idx = INT32_MAX;
    cnt = 0;
  }
  FASTNN_HD void update(acc_t v, int32_t i) {
    // increasing i: a later equal value only adds to the count, the first index stays
    if (v > m) {
      m = v;
      idx = i;
      cnt = 1;
    } else if (v == m) {
      idx = idx < i ? idx : i;
      cnt += 1;
    }
  }
  FASTNN_HD void combine(acc_t om, int32_t oidx, int32_t ocnt) {
    if (om > m) {
      m = om;
      idx = oidx;
      cnt = ocnt;
    } else if (om == m) {
      idx = idx < oidx ? idx : oidx;
      cnt += ocnt;
    }
  }
  // After all elements: make NaN windows (sum is NaN) report NaN with a valid index/count.
  FASTNN_HD void finish(acc_t sum) {
    if (sum != sum) m = sum;
    if (cnt <= 0) {
      idx = 0;
      cnt = 1;
    }
  }
};

// What the forward stores per max: the first index (FIRST) or the tie count (SPLIT).
template <typename acc_t>
FASTNN_HD int32_t sel_of(const MaxState<acc_t>& st, bool first) {
  return first ? st.idx : st.cnt;
}

// Whether element i of a max window receives that max's gradient.
//   FIRST: i is the recorded index.  SPLIT: the element's value equals the max.
template <typename acc_t>
FASTNN_HD bool gets_max_grad(bool first, int32_t i, int32_t sel, acc_t v, acc_t m) {
  return first ? (i == sel) : (v == m);
}

// The gradient of a max per receiving element: FIRST: dm; SPLIT: dm / count.
template <typename acc_t>
FASTNN_HD acc_t max_grad_share(bool first, acc_t dm, int32_t sel) {
  return first ? dm : dm / static_cast<acc_t>(sel);
}

// dx of CBAM at one element, given the small gradients (all per sample):
//   sp = dout*s[p] + da[p]/C + [max_c at (c,p)] * em[p]   (gradient w.r.t. x*g)
//   dx = g[c]*sp + davg[c]/P + [max_p at (c,p)] * emx[c]
// `wa` = da[p]/C, `em` = max_grad_share of dm[p], `a2` = davg[c]/P, `e2` = share of dmx[c].
template <typename acc_t>
FASTNN_HD acc_t cbam_dx(acc_t dout, acc_t s, acc_t g, acc_t wa, bool at_max_s, acc_t em, acc_t a2, bool at_max_c,
                        acc_t e2) {
  acc_t sp = dout * s + wa + (at_max_s ? em : acc_t(0));
  return g * sp + a2 + (at_max_c ? e2 : acc_t(0));
}

// The term of dL/dg[c] that flows through the spatial pool, at one element:
//   x[c,p] * (da[p]/C + [max_c at (c,p)] * em[p])
template <typename acc_t>
FASTNN_HD acc_t cbam_gate_term(acc_t x, acc_t wa, bool at_max_s, acc_t em) {
  return x * (wa + (at_max_s ? em : acc_t(0)));
}

}  // namespace cbam
}  // namespace fastnn
