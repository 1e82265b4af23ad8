"""Tahoe-X1's modules: ``TXModel.transformer_generate`` at inference, tapped per layer, and the official pooling.

llm-foundry ``GroupedQueryAttention`` (``kv_n_heads == n_heads``) in ``tahoebio/tahoe-x1``'s ``TXBlock`` with
``norm_scheme='pre'``; :class:`OfficialPooling` is ``predict_embeddings.py``'s ``cell_emb`` (the final norm of
the CLS token) at any layer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ....kernels import PoolSpec, pool_cast
from ..attention import AttentionLayout, attend
from ..base import FinalNormPooling, PoolingCall, Tap, TokenBatch
from ..layers import ContinuousValueEncoder, GeneEncoder
from .config import ACTIVATIONS, TahoeX1Config


class _Attention(nn.Module):
    """llm-foundry ``GroupedQueryAttention`` with ``kv_n_heads == n_heads``: fused ``Wqkv``, SDPA."""

    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.Wqkv = nn.Linear(d, 3 * d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        b, s, d = x.shape
        h = self.n_heads
        q, k, v = (t.view(b, s, h, d // h) for t in self.Wqkv(x).split(d, dim=-1))
        return self.out_proj(attend(q, k, v, layout).reshape(b, s, d))  # scale 1/sqrt(d/h)


class _Block(nn.Module):
    """``TXBlock`` with ``norm_scheme='pre'``: ``x + attn(norm1(x))``, then ``x + down(act(up(norm2(x))))``."""

    def __init__(self, d: int, n_heads: int, ffn: int, eps: float, activation: str) -> None:
        super().__init__()
        self.self_attn = _Attention(d, n_heads)
        self.up_proj = nn.Linear(d, ffn)
        self.down_proj = nn.Linear(ffn, d)
        self.norm1 = nn.LayerNorm(d, eps=eps)
        self.norm2 = nn.LayerNorm(d, eps=eps)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x), layout)
        return x + self.down_proj(self.activation(self.up_proj(self.norm2(x))))


class _Encoder(nn.Module):
    def __init__(self, layers: Iterable[nn.Module], d: int, eps: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(d, eps=eps)


class TahoeX1Model(nn.Module):
    """``TXModel.transformer_generate`` at inference; ``forward(batch, tap)`` taps layer 0 and each block 1..L.

    The flag encoder is loaded but adds nothing: at inference every ``gen_mask`` is False, so
    ``flag_embs = gen_masks * flag`` is zero. Taps come before the final ``transformer_encoder.norm``.
    """

    def __init__(self, config: TahoeX1Config, pad_id: int) -> None:
        super().__init__()
        d = config.d_model
        self.config = config
        self.n_layers = config.n_layers
        self.hidden_size = d
        self.gene_encoder = GeneEncoder(config.vocab_size, d, pad_id=pad_id, use_norm=config.gene_norm)
        self.flag_encoder = nn.Embedding(2, d)
        self.expression_encoder = ContinuousValueEncoder(
            d,
            activation=ACTIVATIONS[config.expression_activation],
            max_value=float(config.max_value),
            use_norm=config.expression_norm,
        )
        self.transformer_encoder = _Encoder(
            (
                _Block(d, config.n_heads, config.ffn_size, config.norm_eps, config.transformer_activation)
                for _ in range(config.n_layers)
            ),
            d,
            config.norm_eps,
        )

    @property
    def final_norm(self) -> nn.LayerNorm:
        return self.transformer_encoder.norm

    def forward(self, batch: TokenBatch, tap: Tap) -> None:
        layout = batch.attention_layout()
        h = self.gene_encoder(batch.genes) + self.expression_encoder(batch.values.to(torch.float32))
        tap(0, h)
        for i, layer in enumerate(self.transformer_encoder.layers, start=1):
            h = layer(h, layout)
            tap(i, h)
        del h


class OfficialPooling(FinalNormPooling):
    """The published cell embedding at any layer: ``L2-normalise(final_norm(h[:, 0]))``.

    At the last layer this is ``predict_embeddings.py``'s ``cell_emb`` (CLS of the final-norm output)
    divided by its norm. LayerNorm works per token, so norming the CLS token alone is exact.
    """

    def pool(self, call: PoolingCall) -> None:
        n = self.norm
        first = call.hidden[:, 0, :] if call.starts is None else call.hidden[call.starts]
        cls = F.layer_norm(first.float(), n.normalized_shape, n.weight.float(), n.bias.float(), n.eps)
        ones = torch.ones(cls.shape[0], dtype=call.lengths.dtype, device=cls.device)
        spec, out = PoolSpec(("first_l2",)), call.out
        pool_cast(cls.unsqueeze(1), None, ones, spec, out.dtype, out.unsqueeze(0), call.counts, backend=call.backend)
