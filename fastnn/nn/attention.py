"""fastnn.nn.MultiheadAttention: a drop-in for torch.nn.MultiheadAttention."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastnn.ops.flash_attention import scaled_dot_product_attention


class MultiheadAttention(torch.nn.MultiheadAttention):
    """torch.nn.MultiheadAttention with its attention core on fastnn's FlashAttention.

    Same constructor, parameters and state_dict keys as torch's (it subclasses it), so checkpoints
    load both ways. With need_weights=False (the fast path) and no key_padding_mask / general
    attn_mask / bias_k / add_zero_attn, attention runs through
    fastnn.functional.scaled_dot_product_attention (is_causal=True uses the causal kernel, as torch
    does when attn_mask is given as a causal hint). Everything else, including need_weights=True
    (which returns the attention weights), runs torch's implementation."""

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        fast = (not need_weights and key_padding_mask is None and self.bias_k is None and self.bias_v is None
                and not self.add_zero_attn and query.dim() in (2, 3) and key.dim() == query.dim()
                and value.dim() == query.dim() and (attn_mask is None or is_causal)
                # sizes torch checks with its own messages (embed_dim, kdim, vdim): let it
                and query.shape[-1] == self.embed_dim and key.shape[-1] == self.kdim
                and value.shape[-1] == self.vdim
                and not (is_causal and attn_mask is None))  # torch raises for that one: let it
        if not fast:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        # decide packed projections before the transposes below make new tensor objects
        same_qkv, same_kv = query is key and key is value, key is value
        unbatched = query.dim() == 2
        if unbatched:  # (L, E) -> a batch of one
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        elif self.batch_first:  # the projections below work on (L, N, E) views
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        q, k, v = self._project(query, key, value, same_qkv, same_kv)
        tgt_len, bsz, embed = query.shape[0], query.shape[1], self.embed_dim
        heads, hd = self.num_heads, self.head_dim

        def heads_view(t):  # (L, N, E) -> (N, H, L, hd), a view
            return t.view(t.shape[0], bsz, heads, hd).permute(1, 2, 0, 3)

        out = scaled_dot_product_attention(heads_view(q), heads_view(k), heads_view(v),
                                           dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal)
        out = out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, embed)  # (L, N, E)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if unbatched:
            return out.squeeze(1), None
        return (out.transpose(0, 1) if self.batch_first else out), None

    def _project(self, query, key, value, same_qkv, same_kv):
        e = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            if same_qkv:  # self-attention: one packed projection, q/k/v are views of it
                return F.linear(query, w, b).chunk(3, dim=-1)
            if same_kv:
                kv = F.linear(key, w[e:], None if b is None else b[e:]).chunk(2, dim=-1)
                return F.linear(query, w[:e], bq), kv[0], kv[1]
            return F.linear(query, w[:e], bq), F.linear(key, w[e:2 * e], bk), F.linear(value, w[2 * e:], bv)
        return (F.linear(query, self.q_proj_weight, bq), F.linear(key, self.k_proj_weight, bk),
                F.linear(value, self.v_proj_weight, bv))
