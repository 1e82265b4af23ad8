"""scFoundation's encoder (``MaeAutobin``'s ``token_emb``, ``pos_emb`` and ``pytorchTransformerModule``) and
the official ``pool_type='all'`` cell embedding.

Only the encoder is built: cell embeddings never run the MAE decoder.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .... import kernels
from ..attention import AttentionLayout
from ..base import FinalNormPooling, PoolingCall, Tap, TokenBatch
from ..layers import TorchEncoderLayer
from .config import ScFoundationConfig


class AutoDiscretizationEmbedding(nn.Module):
    """``AutoDiscretizationEmbedding2``: a soft assignment of each value to ``bin_num`` learned bins.

    ``h = LeakyReLU_0.1(mlp(v))``; ``w = softmax(bin_alpha * h + mlp2(h))``; ``e = w @ emb.weight``;
    tokens whose value equals the mask / pad value get ``emb_mask`` / ``emb_pad`` instead.
    """

    def __init__(self, dim: int, bin_num: int, bin_alpha: float, mask_value: float, pad_value: float) -> None:
        super().__init__()
        self.mlp = nn.Linear(1, bin_num)
        self.mlp2 = nn.Linear(bin_num, bin_num)
        self.emb = nn.Embedding(bin_num, dim)
        self.emb_mask = nn.Embedding(1, dim)
        self.emb_pad = nn.Embedding(1, dim)
        self.bin_alpha = float(bin_alpha)
        self.mask_value = float(mask_value)
        self.pad_value = float(pad_value)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.mlp(values.unsqueeze(-1)), 0.1)
        weight = torch.softmax(self.bin_alpha * h + self.mlp2(h), dim=-1)
        x = torch.matmul(weight, self.emb.weight.to(weight.dtype))
        x = torch.where((values == self.mask_value).unsqueeze(-1), self.emb_mask.weight[0].to(x.dtype), x)
        return torch.where((values == self.pad_value).unsqueeze(-1), self.emb_pad.weight[0].to(x.dtype), x)


class _Encoder(nn.Module):
    """``pytorchTransformerModule``: ``transformer_encoder`` (a ModuleList of post-norm blocks with a
    ``4 * hidden_dim`` ReLU FFN) and the final ``norm``."""

    def __init__(self, config: ScFoundationConfig) -> None:
        super().__init__()
        d, eps = config.hidden_dim, config.layer_norm_eps
        self.transformer_encoder = nn.ModuleList(
            TorchEncoderLayer(d, config.heads, config.ffn_dim, eps) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(d, eps=eps)

    def hidden_states(self, h: torch.Tensor, layout: AttentionLayout) -> Iterator[torch.Tensor]:
        """``h`` (the embedding), then the output of each block in turn: the official forward without
        ``norm``, one state held at a time."""
        yield h
        for layer in self.transformer_encoder:
            h = layer(h, layout)
            yield h


class ScFoundationModel(nn.Module):
    """scFoundation's encoder; ``forward(batch, tap)`` taps the embedding (0) and each block 1..L.

    ``batch.values`` are the token values, ``batch.genes`` the position ids. ``encoder.norm`` (the final
    LayerNorm) is not applied to the taps; the ``official`` pooling applies it.
    """

    def __init__(self, config: ScFoundationConfig) -> None:
        super().__init__()
        d = config.hidden_dim
        self.config = config
        self.n_layers = config.depth
        self.hidden_size = d
        self.token_emb = AutoDiscretizationEmbedding(
            d, config.bin_num, config.bin_alpha, config.mask_token_id, config.pad_token_id
        )
        self.pos_emb = nn.Embedding(config.pos_rows, d)
        self.encoder = _Encoder(config)

    def embed(self, batch: TokenBatch) -> torch.Tensor:
        """Layer 0: ``token_emb(values) + pos_emb(position ids)``."""
        return self.token_emb(batch.values.to(torch.float32)) + self.pos_emb(batch.genes)

    def forward(self, batch: TokenBatch, tap: Tap) -> None:
        layout = batch.attention_layout()
        for i, h in enumerate(self.encoder.hidden_states(self.embed(batch), layout)):
            tap(i, h)
        del h


# ------------------------------------------------------------------------------------------------
# poolings

# S, T, max and mean over the genes: get_embedding.py's pool_type 'all' concat order
OFFICIAL_SPEC = kernels.PoolSpec(("from_end:1", "from_end:2", "max", "mean"), n_leading=0, n_trailing=2)


class OfficialPooling(FinalNormPooling):
    """The published ``pool_type='all'`` embedding at every layer: ``[S, T, max, mean]`` of ``encoder.norm(h)``.

    ``get_embedding.py`` concatenates ``geneemb[:, -1]`` (S), ``geneemb[:, -2]`` (T) and the max and the
    mean over ``geneemb[:, :-2]`` (the genes) of the encoder output (after its final LayerNorm); at
    layer L this is that embedding, at layer ℓ the same recipe on ``encoder.norm(h_ℓ)``.
    """

    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__(norm, n_vectors=4)

    def pool(self, call: PoolingCall) -> None:
        normed = self.norm(call.hidden)
        view = call.out.unflatten(-1, (4, call.hidden.shape[-1])).transpose(0, 1)  # [4, B, H] view of [B, 4H]
        spec, backend = OFFICIAL_SPEC, call.backend
        kernels.pool_cast(normed, call.starts, call.lengths, spec, call.out.dtype, view, call.counts, backend=backend)
        del normed
