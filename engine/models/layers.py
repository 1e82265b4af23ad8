"""Transformer building blocks shared by the model families (parameter names as the official checkpoints)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionLayout, attend


class PackedSelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s packed ``in_proj`` layout, computed by SDPA.

    ``layout`` says how the batch is laid out (padded with a key mask, or packed); see :mod:`.attention`.
    """

    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d, d))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d))
        self.out_proj = nn.Linear(d, d)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        b, s, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, s, 3, self.n_heads, d // self.n_heads).unbind(2)
        return self.out_proj(attend(q, k, v, layout).reshape(b, s, d))


class TorchEncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer(d, n_heads, ffn, batch_first=True)`` with a ReLU FFN, in eval mode.

    Post-norm (torch's default, scGPT and scFoundation) unless ``pre_norm``, which follows scGPT's
    ``FlashTransformerEncoderLayer(norm_scheme="pre")``: the residual is taken after each norm.
    """

    def __init__(self, d: int, n_heads: int, ffn: int, eps: float, *, pre_norm: bool = False) -> None:
        super().__init__()
        self.self_attn = PackedSelfAttention(d, n_heads)
        self.linear1 = nn.Linear(d, ffn)
        self.linear2 = nn.Linear(ffn, d)
        self.norm1 = nn.LayerNorm(d, eps=eps)
        self.norm2 = nn.LayerNorm(d, eps=eps)
        self.pre_norm = pre_norm

    def forward(self, x: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        if self.pre_norm:
            x = self.norm1(x)
            x = x + self.self_attn(x, layout)
            x = self.norm2(x)
            return x + self.linear2(F.relu(self.linear1(x)))
        x = self.norm1(x + self.self_attn(x, layout))
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


class GeneEncoder(nn.Module):
    """scGPT / Tahoe-X1 ``GeneEncoder``: token embedding, then ``enc_norm`` LayerNorm (or identity)."""

    def __init__(self, vocab_size: int, d: int, *, pad_id: int | None = None, use_norm: bool = True) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d, padding_idx=pad_id)
        self.enc_norm = nn.LayerNorm(d) if use_norm else nn.Identity()

    def forward(self, genes: torch.Tensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(genes))


class ContinuousValueEncoder(nn.Module):
    """scGPT / Tahoe-X1 ``ContinuousValueEncoder``: clamp(max) -> Linear(1, d) -> act -> Linear(d, d) -> norm."""

    def __init__(
        self,
        d: int,
        *,
        activation: Callable[[torch.Tensor], torch.Tensor] = F.relu,
        max_value: float = 512.0,
        use_norm: bool = True,
    ) -> None:
        super().__init__()
        self.linear1 = nn.Linear(1, d)
        self.linear2 = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d) if use_norm else nn.Identity()
        self.activation = activation
        self.max_value = max_value

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        x = torch.clamp(values.unsqueeze(-1), max=self.max_value)
        return self.norm(self.linear2(self.activation(self.linear1(x))))
