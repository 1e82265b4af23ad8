"""Geneformer's encoder: the BERT of ``BertForMaskedLM`` with a tap after the embeddings and each layer.

Module and parameter names follow transformers' ``BertModel``, so the released keys map one to one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import AttentionLayout, attend
from ..base import Tap, TokenBatch
from .config import GeneformerConfig


def _activation(name: str) -> Any:
    if name == "relu":
        return F.relu
    if name == "gelu":
        return F.gelu
    return lambda x: F.gelu(x, approximate="tanh")  # gelu_new, gelu_pytorch_tanh


class _Embeddings(nn.Module):
    def __init__(self, c: GeneformerConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``LayerNorm(word[ids] + token_type[0] + position[pos])`` (BertEmbeddings' order of sums).

        ``pos`` is ``0..S-1`` for every row, or ``position_ids`` (each token's index in its own cell, packed).
        """
        h = self.word_embeddings(ids) + self.token_type_embeddings.weight[0]
        if position_ids is None:
            h = h + self.position_embeddings.weight[: ids.shape[1]]
        else:
            h = h + self.position_embeddings(position_ids)
        return self.LayerNorm(h)


class _SelfAttention(nn.Module):
    def __init__(self, c: GeneformerConfig) -> None:
        super().__init__()
        self.n_heads = c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        b, s, d = x.shape
        shape = (b, s, self.n_heads, d // self.n_heads)
        q, k, v = self.query(x).view(shape), self.key(x).view(shape), self.value(x).view(shape)
        return attend(q, k, v, layout).reshape(b, s, d)  # scale 1/sqrt(head_dim)


class _DenseNorm(nn.Module):
    """``LayerNorm(dense(x) + residual)`` (BertSelfOutput / BertOutput)."""

    def __init__(self, d_in: int, d_out: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, c: GeneformerConfig) -> None:
        super().__init__()
        self.self = _SelfAttention(c)
        self.output = _DenseNorm(c.hidden_size, c.hidden_size, c.layer_norm_eps)

    def forward(self, x: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        return self.output(self.self(x, layout), x)


class _Intermediate(nn.Module):
    def __init__(self, c: GeneformerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)
        self.act = _activation(c.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class _Layer(nn.Module):
    """One post-LN BERT block."""

    def __init__(self, c: GeneformerConfig) -> None:
        super().__init__()
        self.attention = _Attention(c)
        self.intermediate = _Intermediate(c)
        self.output = _DenseNorm(c.intermediate_size, c.hidden_size, c.layer_norm_eps)

    def forward(self, x: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        x = self.attention(x, layout)
        return self.output(self.intermediate(x), x)


class _Encoder(nn.Module):
    def __init__(self, c: GeneformerConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(c) for _ in range(c.num_hidden_layers))


class GeneformerModel(nn.Module):
    """The BERT encoder of ``BertForMaskedLM``; ``forward(batch, tap)`` taps ``hidden_states[0..N]``."""

    def __init__(self, config: GeneformerConfig) -> None:
        super().__init__()
        self.config = config
        self.n_layers = config.num_hidden_layers
        self.hidden_size = config.hidden_size
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)

    def forward(self, batch: TokenBatch, tap: Tap) -> None:
        if batch.max_len > self.config.max_position_embeddings:
            msg = (
                f"a cell of {batch.max_len} tokens exceeds Geneformer's {self.config.max_position_embeddings} positions"
            )
            raise ValueError(msg)
        layout = batch.attention_layout()
        h = self.embeddings(batch.genes, batch.position_ids() if batch.packed else None)
        tap(0, h)
        for i, layer in enumerate(self.encoder.layer, start=1):
            h = layer(h, layout)
            tap(i, h)
        del h
