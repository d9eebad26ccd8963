"""ERNIE 4.5 text decoder (dense and MoE) and its causal-LM head, with the optional MTP block.

Single-device model code: positions and attention metadata come in explicitly, logits are computed separately
(`compute_logits`) so an engine can run the decoder on flattened tokens and project only the positions it samples.
Parameter names mirror transformers' (`model.layers.N.self_attn.q_proj.weight`, ...); the checkpoint adapter maps
the released per-expert layout onto the stacked expert tensors. Legend: B batch, T tokens, H hidden, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .attention import Attention, AttentionBackend, CausalAttention
from .config import Ernie45Config
from .inputs import ModelInputs
from .layers import Linear, RMSNorm, RotaryEmbedding, SwiGLU
from .moe import ModalityMoeBlock, MoeBlock


class DecoderLayer(nn.Module):
    """Pre-norm block: h = x + Attn(norm(x)); y = h + MLP(norm(h)), the MLP dense or MoE."""

    def __init__(
        self,
        config: Ernie45Config,
        layer_idx: int,
        moe: bool,
        moe_block: Callable[[Ernie45Config], nn.Module] = MoeBlock,
    ):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = moe_block(config) if moe else SwiGLU(config.hidden_size, config.intermediate_size, config.use_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x_BTH: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn_metadata: AttentionBackend,
        router_logits: list[torch.Tensor] | None = None,
        moe_token_types: torch.Tensor | None = None,
    ) -> torch.Tensor:
        attn_BTH = self.self_attn(self.input_layernorm(x_BTH), rope, attn_metadata)
        h, normed = self.post_attention_layernorm.add_and_norm(x_BTH, attn_BTH)
        if isinstance(self.mlp, ModalityMoeBlock):
            return h + self.mlp(normed, moe_token_types, router_logits)
        if isinstance(self.mlp, MoeBlock):
            return h + self.mlp(normed, router_logits)
        return h + self.mlp(normed)


class Ernie45Model(nn.Module):
    """Embedding + decoder layers + final norm (+ MTP modules when `num_mtp_layers` > 0).

    `moe_block` builds the MLP of the MoE layers (the VL model passes its modality-isolated block)."""

    def __init__(
        self, config: Ernie45Config, num_mtp_layers: int = 0, moe_block: Callable[[Ernie45Config], nn.Module] = MoeBlock
    ):
        super().__init__()
        self.config = config
        H = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, H)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, moe=config.is_moe_layer(i), moe_block=moe_block)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(H, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.compression_ratio)
        self.num_mtp_layers = 0
        if num_mtp_layers:
            self.add_mtp_layers(num_mtp_layers)

    def add_mtp_layers(self, num_mtp_layers: int) -> None:
        """Grow to `num_mtp_layers` MTP depths; the new ones take the embedding's device and dtype and hold
        uninitialised weights (a trainer initialises them: training/mtp_layers.py)."""
        config, H = self.config, self.config.hidden_size
        if num_mtp_layers <= self.num_mtp_layers:
            return
        if not self.num_mtp_layers:
            self.mtp_emb_norm, self.mtp_hidden_norm = nn.ModuleList(), nn.ModuleList()
            self.mtp_linear_proj, self.mtp_block = nn.ModuleList(), nn.ModuleList()
        # MTP attention layers come after the main stack in a KV cache: layer index num_hidden_layers + d.
        L = config.num_hidden_layers
        where = {"device": self.embed_tokens.weight.device, "dtype": self.embed_tokens.weight.dtype}
        for d in range(self.num_mtp_layers, num_mtp_layers):
            self.mtp_emb_norm.append(RMSNorm(H, config.rms_norm_eps).to(**where))
            self.mtp_hidden_norm.append(RMSNorm(H, config.rms_norm_eps).to(**where))
            self.mtp_linear_proj.append(Linear(2 * H, H, bias=config.use_bias).to(**where))
            self.mtp_block.append(DecoderLayer(config, L + d, moe=False).to(**where))
        self.num_mtp_layers = num_mtp_layers

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor | None = None,
        attn_metadata: AttentionBackend | None = None,
        inputs_embeds: torch.Tensor | None = None,
        router_logits: list[torch.Tensor] | None = None,
        moe_token_types: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] (or inputs_embeds [B, T, H]) -> hidden states [B, T, H] BEFORE the final norm.

        positions [B, T] or [T] (3-D RoPE: [3, B, T]) default to 0..T-1; attn_metadata defaults to cache-free causal
        attention. If `router_logits` is a list, each MoE layer appends its fp32 router logits [tokens, E] to it.
        `moe_token_types` [B, T] (VL: 0 text, non-zero vision) picks each token's expert set in modality MoE layers.
        """
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device)
        rope = self.rotary_emb(positions)
        attn_metadata = attn_metadata if attn_metadata is not None else CausalAttention()
        # A backend may run every layer of a decode step at once (the static cache: models/fused_decode.py).
        run_fused = getattr(attn_metadata, "run_fused_layers", None)
        if run_fused is not None and router_logits is None and moe_token_types is None:
            fused = run_fused(self, x, rope)
            if fused is not None:
                return fused
        for layer in self.layers:
            x = layer(x, rope, attn_metadata, router_logits, moe_token_types)
        return x

    def mtp_forward(
        self,
        next_input_ids: torch.Tensor,
        hidden_BTH: torch.Tensor,
        positions: torch.Tensor | None = None,
        attn_metadata: AttentionBackend | None = None,
        depth: int = 0,
    ) -> torch.Tensor:
        """MTP step `depth`: from the pre-norm hidden state at t and the token at t+1, the hidden for t+2."""
        if depth >= self.num_mtp_layers:
            raise ValueError(f"MTP depth {depth} requested but the model has {self.num_mtp_layers} MTP layer(s)")
        if positions is None:
            positions = torch.arange(hidden_BTH.shape[1], device=hidden_BTH.device)
        emb = self.mtp_emb_norm[depth](self.embed_tokens(next_input_ids))
        hid = self.mtp_hidden_norm[depth](hidden_BTH)
        x = self.mtp_linear_proj[depth](torch.cat([emb, hid], dim=-1))
        attn_metadata = attn_metadata if attn_metadata is not None else CausalAttention()
        return self.mtp_block[depth](x, self.rotary_emb(positions), attn_metadata)


class Ernie45ForCausalLM(nn.Module):
    """`model(input_ids)` -> logits [B, T, V] (plain path); `forward_hidden` + `compute_logits` for engines."""

    def __init__(self, config: Ernie45Config, num_mtp_layers: int = 0):
        super().__init__()
        self.config = config
        self.model = Ernie45Model(config, num_mtp_layers)
        # transformers gives the MoE head a bias when use_bias (the dense head never has one): keep both layouts.
        head_bias = config.use_bias and config.model_type == "ernie4_5_moe"
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=head_bias)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def tie_weights(self) -> None:
        """Re-point the head at the embedding (needed after weights are materialised from the meta device)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_buffers(self) -> None:
        """Recompute the non-persistent buffers (RoPE frequencies) on the weights' device: checkpoints do not carry
        them, and a model built on the meta device has none."""
        c = self.config
        self.model.rotary_emb = RotaryEmbedding(c.head_dim, c.rope_theta, c.compression_ratio).to(self.device)

    def forward_hidden(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor | None = None,
        attn_metadata: AttentionBackend | None = None,
        inputs_embeds: torch.Tensor | None = None,
        router_logits: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, attn_metadata, inputs_embeds, router_logits)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Pre-norm hidden states [..., H] -> logits [..., V] (final norm + LM head)."""
        return self.lm_head(self.model.norm(hidden))

    # ---- the protocol every family shares (models/inputs.py) -------------------------------------------------
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [..., H] (no media)."""
        return self.model.embed_tokens(input_ids)

    def prepare_inputs(self, input_ids_BT: torch.Tensor, **media) -> ModelInputs:
        """A prompt's inputs: positions 0..T-1. Text models take no media (ValueError naming what was given)."""
        given = sorted(k for k, v in media.items() if v is not None)
        if given:
            raise ValueError(f"{', '.join(given)}: image / video inputs need a VL model; this is a text model")
        return ModelInputs(input_ids_BT, torch.arange(input_ids_BT.shape[1], device=input_ids_BT.device))

    def decode_inputs(self, next_ids_BT: torch.Tensor, position: int, prompt: ModelInputs) -> ModelInputs:
        """The inputs of tokens generated after `prompt`, the first of them at cache position `position`."""
        T = next_ids_BT.shape[1]
        return ModelInputs(next_ids_BT, torch.arange(position, position + T, device=next_ids_BT.device))

    def forward_inputs(
        self,
        inputs: ModelInputs,
        attn_metadata: AttentionBackend | None = None,
        router_logits: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`ModelInputs` -> pre-norm hidden states [B, T, H]."""
        return self.forward_hidden(inputs.input_ids, inputs.positions, attn_metadata, inputs.inputs_embeds,
                                   router_logits)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor | None = None,
        attn_metadata: AttentionBackend | None = None,
        inputs_embeds: torch.Tensor | None = None,
        router_logits: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        return self.compute_logits(self.forward_hidden(input_ids, positions, attn_metadata, inputs_embeds, router_logits))

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Fresh random weights (normal(0, initializer_range), norms at 1, biases at 0) for untrained models."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight") or ".mtp_emb_norm." in name or ".mtp_hidden_norm." in name:
                    p.fill_(1.0)
                elif name.endswith(".bias") or name.endswith("e_score_correction_bias"):
                    p.zero_()
                else:
                    p.normal_(0.0, std, generator=generator)
