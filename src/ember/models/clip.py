"""The CLIP text transformer (Radford et al. 2021; OpenCLIP's is the same network) in plain torch,
under transformers' `CLIPTextModel` parameter names.

SD 1.x (CLIP ViT-L/14), SD 2.x (OpenCLIP ViT-H/14) and SDXL (both ViT-L and ViT-bigG) encode
prompts with it. Building it here rather than with `transformers.CLIPTextModel` keeps
`transformers` (about 4 s of imports) out of `ember generate`; exporting a diffusers folder still
writes transformers' config. Pre-norm blocks, a causal mask only (SD encodes the padding too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.config import TextConfig
from ember.models.bert import make_embedding

CLIP_LAYER_NORM_EPS = 1e-5

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI CLIP's sigmoid approximation
    "gelu": F.gelu,  # OpenCLIP: exact (erf) GELU
}


class ClipLayer(nn.Module):
    """One pre-norm block with transformers' `CLIPEncoderLayer` names (`self_attn.q_proj`,
    `layer_norm1`, `mlp.fc1`, ...), so CLIP files and their LoRAs load without renaming."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.self_attn = nn.ModuleDict(
            {n: nn.Linear(d, d) for n in ("k_proj", "v_proj", "q_proj", "out_proj")}
        )
        self.layer_norm1 = nn.LayerNorm(d, eps=CLIP_LAYER_NORM_EPS)
        self.mlp = nn.ModuleDict(
            {"fc1": nn.Linear(d, cfg.intermediate_size), "fc2": nn.Linear(cfg.intermediate_size, d)}
        )
        self.layer_norm2 = nn.LayerNorm(d, eps=CLIP_LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, D) -> (B, L, D); each token attends to itself and the tokens before it."""
        attn, h = self.self_attn, self.layer_norm1(x)
        q, k, v = (
            attn[n](h).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, H, L, D/H)
            for n in ("q_proj", "k_proj", "v_proj")
        )
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
        x = x + attn["out_proj"](h)
        return x + self.mlp["fc2"](self.act(self.mlp["fc1"](self.layer_norm2(x))))


class ClipText(nn.Module):
    """transformers' `CLIPTextModel` in plain torch, under the same parameter names
    (`embeddings.token_embedding`, `encoder.layers.{i}.*`, `final_layer_norm`). No buffers:
    positions come from the caller, so it builds on the meta device and loads with `assign=True`.
    """

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        if cfg.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"CLIP hidden_act {cfg.hidden_act!r} is not supported; use one of "
                f"{', '.join(_ACTIVATIONS)}"
            )
        d = cfg.hidden_size
        self.embeddings = nn.ModuleDict(
            {
                "token_embedding": make_embedding(cfg.vocab_size, d),
                "position_embedding": make_embedding(cfg.max_length, d),
            }
        )
        self.encoder = nn.ModuleDict(
            {"layers": nn.ModuleList(ClipLayer(cfg) for _ in range(cfg.num_layers))}
        )
        self.final_layer_norm = nn.LayerNorm(d, eps=CLIP_LAYER_NORM_EPS)
        if not self.final_layer_norm.weight.is_meta:
            self._init_weights(cfg)

    @torch.no_grad()
    def _init_weights(self, cfg: TextConfig) -> None:
        """CLIP's initialisation (OpenAI CLIP's `initialize_parameters`, as transformers'
        `CLIPTextModel` draws it): small embeddings and depth-scaled projections, zero biases. A
        model trained from scratch starts from it (torch's defaults give contexts 50x larger)."""
        d, depth = cfg.hidden_size, (2 * cfg.num_layers) ** -0.5
        for table in self.embeddings.values():
            table.weight.normal_(0, 0.02)
        for layer in self.encoder["layers"]:
            for name, proj in layer.self_attn.items():
                proj.weight.normal_(0, d**-0.5 * (1 if name == "out_proj" else depth))
            layer.mlp["fc1"].weight.normal_(0, (2 * d) ** -0.5)
            layer.mlp["fc2"].weight.normal_(0, d**-0.5 * depth)
            for linear in (*layer.self_attn.values(), *layer.mlp.values()):
                linear.bias.zero_()

    def forward(
        self, ids: torch.Tensor, position_ids: torch.Tensor, layers: int
    ) -> list[torch.Tensor]:
        """The embeddings' output and the outputs of the first `layers` layers, (B, L, D) each:
        transformers' `hidden_states`, without running the layers after `layers`."""
        emb = self.embeddings
        states = [emb["token_embedding"](ids) + emb["position_embedding"](position_ids)]
        for layer in self.encoder["layers"][:layers]:
            states.append(layer(states[-1]))
        return states
