"""scGPT's embedding path as an ``nn.Module`` with the official parameter names (``TransformerModel._encode``:
gene embedding + continuous value encoder, then the post-norm encoder layers)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ...errors import CheckpointError
from ..base import Tap, TokenBatch
from ..layers import ContinuousValueEncoder, GeneEncoder, TorchEncoderLayer
from .config import ScGPTConfig


class _Encoder(nn.Module):
    def __init__(self, layers: Iterable[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)


class ScGPTModel(nn.Module):
    """scGPT's embedding path; ``forward(batch, tap)`` taps layer 0 (embeddings) and each block 1..L."""

    def __init__(self, config: ScGPTConfig) -> None:
        super().__init__()
        if config.input_emb_style != "continuous":
            msg = (
                f"scGPT input_emb_style {config.input_emb_style!r} is not supported; the released models "
                "(and embed_data) use 'continuous'"
            )
            raise CheckpointError(msg)
        d = config.embsize
        self.config = config
        self.n_layers = config.nlayers
        self.hidden_size = d
        self.encoder = GeneEncoder(config.vocab_size, d)
        self.value_encoder = ContinuousValueEncoder(d)
        self.transformer_encoder = _Encoder(
            TorchEncoderLayer(d, config.nheads, config.d_hid, config.layer_norm_eps, pre_norm=config.pre_norm)
            for _ in range(config.nlayers)
        )

    def embed(self, batch: TokenBatch) -> torch.Tensor:
        """Layer 0: gene embedding + value encoding (``_encode``'s ``total_embs``)."""
        return self.encoder(batch.genes) + self.value_encoder(batch.values.to(torch.float32))

    def forward(self, batch: TokenBatch, tap: Tap) -> None:
        layout = batch.attention_layout()
        h = self.embed(batch)
        tap(0, h)
        for i, layer in enumerate(self.transformer_encoder.layers, start=1):
            h = layer(h, layout)
            tap(i, h)
        del h
