"""BERT (Devlin et al. 2019) in plain torch, under transformers' `BertModel` parameter names.

ember-small's text encoder is all-MiniLM-L6-v2, a 6-layer BERT. Building it here rather than with
`transformers.BertModel` keeps `transformers` (about 3 s of imports) out of `ember generate`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.config import TextConfig

BERT_MAX_POSITIONS = 512
BERT_TYPE_VOCAB = 2
BERT_LAYER_NORM_EPS = 1e-12


def make_embedding(num: int, dim: int, padding_idx: int | None = None) -> nn.Embedding:
    """`nn.Embedding(num, dim, padding_idx)` that skips `normal_` on the meta device, where it goes
    through `torch._refs` and imports `torch._dynamo`: about 1 s of start-up for nothing."""
    weight = torch.empty(num, dim)
    if not weight.is_meta:
        nn.init.normal_(weight)
        if padding_idx is not None:
            weight[padding_idx] = 0
    return nn.Embedding.from_pretrained(weight, freeze=False, padding_idx=padding_idx)


class BertLayer(nn.Module):
    """One post-norm BERT block (Devlin et al. 2019) with transformers' `BertLayer` names.

    The `ModuleDict`s only reproduce those names (`attention.self.query`, `attention.output.dense`,
    `intermediate.dense`, `output.LayerNorm`, ...), so BERT files load without renaming.
    """

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        d, eps = cfg.hidden_size, BERT_LAYER_NORM_EPS
        self.num_heads = cfg.num_heads
        self.attention = nn.ModuleDict(
            {
                "self": nn.ModuleDict({n: nn.Linear(d, d) for n in ("query", "key", "value")}),
                "output": nn.ModuleDict(
                    {"dense": nn.Linear(d, d), "LayerNorm": nn.LayerNorm(d, eps=eps)}
                ),
            }
        )
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(d, cfg.intermediate_size)})
        self.output = nn.ModuleDict(
            {"dense": nn.Linear(cfg.intermediate_size, d), "LayerNorm": nn.LayerNorm(d, eps=eps)}
        )

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x (B, L, D); keep (B, 1, 1, L) bool, False for keys that are padding."""
        heads = self.attention["self"]
        q, k, v = (
            heads[n](x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, H, L, D/H)
            for n in ("query", "key", "value")
        )
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).flatten(2)
        out = self.attention["output"]
        x = out["LayerNorm"](x + out["dense"](h))
        h = self.output["dense"](F.gelu(self.intermediate["dense"](x)))  # exact (erf) GELU
        return self.output["LayerNorm"](x + h)


class Bert(nn.Module):
    """transformers' `BertModel` without pooler, in plain torch, under the same parameter names
    (`embeddings.word_embeddings`, `encoder.layer.{i}.*`). No buffers: positions come from the
    caller, token types are all 0, so it builds on the meta device and loads with `assign=True`.
    """

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        if cfg.hidden_act != "gelu":
            raise ValueError(f"BERT hidden_act {cfg.hidden_act!r} is not supported; use 'gelu'")
        d = cfg.hidden_size
        self.embeddings = nn.ModuleDict(
            {
                "word_embeddings": make_embedding(cfg.vocab_size, d, padding_idx=cfg.pad_token_id),
                "position_embeddings": make_embedding(BERT_MAX_POSITIONS, d),
                "token_type_embeddings": make_embedding(BERT_TYPE_VOCAB, d),
                "LayerNorm": nn.LayerNorm(d, eps=BERT_LAYER_NORM_EPS),
            }
        )
        layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_layers))
        self.encoder = nn.ModuleDict({"layer": layers})

    def forward(
        self, ids: torch.Tensor, position_ids: torch.Tensor, keep: torch.Tensor, depth: int
    ) -> torch.Tensor:
        """Hidden states (B, L, D) after the first `depth` layers; `keep` as in `BertLayer`."""
        emb = self.embeddings
        # One segment (token type 0); summed in transformers' order.
        x = emb["word_embeddings"](ids) + emb["token_type_embeddings"].weight[0]
        x = emb["LayerNorm"](x + emb["position_embeddings"](position_ids))
        for layer in self.encoder["layer"][:depth]:
            x = layer(x, keep)
        return x
