"""ERNIE 4.5 VL (multimodal heterogeneous MoE): vision tower + resampler feeding the MoE language model, whose text
and vision tokens share attention and shared experts but route to separate expert sets, with 3-D RoPE.

Parameter names mirror transformers' in-memory names (`model.language_model.*`, `model.vision_tower.*`,
`model.resampler_model.*`, `lm_head`); `checkpoint/hf_layout_vl.py` maps the released layout onto them.
`forward` takes transformers' argument names and returns logits; engines use `embed` + `forward_hidden` +
`compute_logits`. Legend: B batch, T tokens, H hidden, N patches.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .attention import AttentionBackend
from .ernie45 import Ernie45Model
from .inputs import ModelInputs
from .layers import Linear, MRotaryEmbedding
from .moe import ModalityMoeBlock
from .resampler import Resampler
from .vision import VisionTransformer
from .vl_config import Ernie45VLConfig
from .vl_positions import IMAGE, VIDEO, rope_positions, token_types


class Ernie45VLModel(nn.Module):
    def __init__(self, config: Ernie45VLConfig):
        super().__init__()
        moe_block = functools.partial(ModalityMoeBlock, vision_intermediate_size=config.vision_moe_intermediate_size)
        self.language_model = Ernie45Model(config.text, moe_block=moe_block)
        self.language_model.rotary_emb = MRotaryEmbedding(
            config.text.head_dim, config.text.rope_theta, config.mrope_section
        )
        self.vision_tower = VisionTransformer(config.vision)
        self.resampler_model = Resampler(config)


class Ernie45VLForConditionalGeneration(nn.Module):
    """`model(input_ids, pixel_values=..., image_grid_thw=..., ...)` -> logits [B, T, V]."""

    def __init__(self, config: Ernie45VLConfig, num_mtp_layers: int = 0):
        super().__init__()
        if num_mtp_layers:
            raise ValueError(f"ERNIE 4.5 VL models have no MTP layers (asked for {num_mtp_layers})")
        self.config = config
        self.model = Ernie45VLModel(config)
        self.lm_head = Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    def init_buffers(self) -> None:
        """Recompute the non-persistent buffers (3-D RoPE and vision RoPE frequencies) on the weights' device:
        checkpoints do not carry them, and a model built on the meta device has none."""
        text, device = self.config.text, self.device
        self.model.language_model.rotary_emb = MRotaryEmbedding(
            text.head_dim, text.rope_theta, self.config.mrope_section
        ).to(device)
        self.model.vision_tower.inv_freq = VisionTransformer.compute_inv_freq(self.config.vision).to(device)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.language_model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.language_model.embed_tokens.weight.device

    # ---- vision --------------------------------------------------------------------------------------------
    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """Patches [N, C*P*P] of images or videos -> language-model embeddings [tokens, H] (all items concatenated)."""
        features = self.model.vision_tower(pixel_values.to(self.device), image_grid_thw)
        return self.model.resampler_model(features, image_grid_thw)

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings [B, T, H] with the image/video placeholders replaced by the vision embeddings, in order."""
        x = self.model.language_model.embed_tokens(input_ids)
        for pixels, grid, token_id, name in (
            (pixel_values, image_grid_thw, self.config.image_token_id, "image"),
            (pixel_values_videos, video_grid_thw, self.config.video_token_id, "video"),
        ):
            if pixels is None:
                continue
            if grid is None:
                raise ValueError(f"{name} pixel values were given without {name}_grid_thw")
            feats = self.get_image_features(pixels, grid).to(x.dtype)
            mask = input_ids == token_id
            if int(mask.sum()) != feats.shape[0]:
                raise ValueError(
                    f"{int(mask.sum())} {name} placeholder tokens in input_ids, but the {name}s give {feats.shape[0]} "
                    f"embeddings (grid_thw {grid.tolist()})"
                )
            x = x.masked_scatter(mask[..., None], feats)
        return x

    def positions(
        self,
        input_ids: torch.Tensor,
        image_grid_thw: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """3-D positions [3, B, T] and the decode delta [B, 1] (see `vl_positions`)."""
        if mm_token_type_ids is None:
            mm_token_type_ids = token_types(
                input_ids, {self.config.image_token_id: IMAGE, self.config.video_token_id: VIDEO}
            )
        vision = self.config.vision
        return rope_positions(
            input_ids,
            mm_token_type_ids,
            image_grid_thw,
            video_grid_thw,
            vision.spatial_merge_size,
            vision.temporal_merge_size,
            attention_mask,
        )

    def moe_token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Routing modality per token: placeholders and image/video start/end tokens are vision tokens."""
        return token_types(input_ids, self.config.vision_token_ids)

    # ---- language model ------------------------------------------------------------------------------------
    def forward_hidden(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor | None = None,
        attn_metadata: AttentionBackend | None = None,
        moe_token_types: torch.Tensor | None = None,
        router_logits: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Embeddings [B, T, H] -> pre-norm hidden states; positions [3, B, T] (or 1-D text positions)."""
        return self.model.language_model(
            None, positions, attn_metadata, inputs_embeds, router_logits, moe_token_types=moe_token_types
        )

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.language_model.norm(hidden))

    # ---- the protocol every family shares (models/inputs.py) -------------------------------------------------
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [..., H] without media (placeholders keep their own embedding)."""
        return self.model.language_model.embed_tokens(input_ids)

    def prepare_inputs(
        self,
        input_ids_BT: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
    ) -> ModelInputs:
        """A prompt's inputs: vision features merged into the embeddings, 3-D positions, routing types."""
        x = self.embed(input_ids_BT, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        positions, delta_B1 = self.positions(input_ids_BT, image_grid_thw, video_grid_thw)
        return ModelInputs(input_ids_BT, positions, x, self.moe_token_types(input_ids_BT), delta_B1)

    def decode_inputs(self, next_ids_BT: torch.Tensor, position: int, prompt: ModelInputs) -> ModelInputs:
        """Generated tokens after `prompt`, the first at cache position `position`: text tokens at position + delta
        on all three axes, routed as text (as in transformers' decode)."""
        B, T = next_ids_BT.shape
        delta_B1 = prompt.rope_delta if prompt.rope_delta is not None else torch.zeros(B, 1, dtype=torch.long)
        steps = torch.arange(position, position + T, device=delta_B1.device)
        positions = (steps[None] + delta_B1).unsqueeze(0).expand(3, B, T)
        return ModelInputs(next_ids_BT, positions, None, None, delta_B1)

    def forward_inputs(
        self,
        inputs: ModelInputs,
        attn_metadata: AttentionBackend | None = None,
        router_logits: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`ModelInputs` -> pre-norm hidden states [B, T, H]."""
        x = inputs.inputs_embeds if inputs.inputs_embeds is not None else self.embed_input_ids(inputs.input_ids)
        return self.forward_hidden(x, inputs.positions, attn_metadata, inputs.moe_token_types, router_logits)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        moe_mm_token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        attn_metadata: AttentionBackend | None = None,
    ) -> torch.Tensor:
        """transformers' argument names -> logits [B, T, V]. Token types default to those implied by input_ids."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "padded batches are not supported by the plain forward; run rows separately or use the engine"
            )
        x = self.embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        if position_ids is None:
            position_ids, _ = self.positions(input_ids, image_grid_thw, video_grid_thw, mm_token_type_ids)
        if moe_mm_token_type_ids is None:
            moe_mm_token_type_ids = self.moe_token_types(input_ids)
        return self.compute_logits(self.forward_hidden(x, position_ids, attn_metadata, moe_mm_token_type_ids))

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Fresh random weights: normal(0, initializer_range) matrices, norms at 1, biases and correction biases 0."""
        std = self.config.text.initializer_range
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("e_score_correction_bias") or name.endswith(".bias"):
                    p.zero_()
                elif p.dim() == 1:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, std, generator=generator)
