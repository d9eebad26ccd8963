"""VL prompts in the engine: placeholders expanded, 3-D positions precomputed, vision embeddings encoded once per
request (on its first prefill chunk) and handed out chunk by chunk, so chunked prefill never splits an image
wrongly; the processed pixels' hash joins the prefix-cache keys, so different images never share KV.
Legend: T prompt tokens, H hidden.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ..models.inputs import ModelInputs
from ..models.vl_positions import rope_positions, token_types


@dataclass
class MultimodalInputs:
    """Processed media of one prompt and where their embedding rows go."""

    media: dict[str, torch.Tensor]
    """pixel_values / image_grid_thw / pixel_values_videos / video_grid_thw (those present)."""
    positions_3T: torch.Tensor
    """3-D RoPE positions of the prompt tokens."""
    rope_delta: int
    """Generated token t sits at position t + rope_delta on all three axes."""
    rows_T: torch.Tensor
    """Per prompt token, its row in `embeds` (image rows first, then video rows), -1 for text."""
    moe_types_T: torch.Tensor
    """Per prompt token, the expert set it routes to (0 text, 1 image, 2 video)."""
    content_hash: bytes
    """sha256 of the processed pixels and grids."""
    embeds: torch.Tensor | None = None
    """Vision embeddings [rows, H], filled by `encode`."""

    def encode(self, model) -> torch.Tensor:
        if self.embeds is None:
            parts = []
            for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
                if pixels in self.media:
                    parts.append(model.get_image_features(self.media[pixels], self.media[grid]))
            self.embeds = torch.cat(parts).to(model.dtype)
        return self.embeds


def prepare_multimodal(config, image_processor, video_processor, token_ids: list[int], data: dict):
    """`config`: the VL model's config (no model needed: this runs in the client process). Prompt ids with one placeholder per image / video + {"image": [...], "video": [...]} -> (expanded ids,
    MultimodalInputs). Raises ValueError (MediaError for unusable media) on any mismatch."""
    from ..processing import expand_placeholders

    unknown = set(data) - {"image", "video"}
    if unknown:
        raise ValueError(f"multi_modal_data keys must be 'image' and/or 'video', got {sorted(unknown)}")
    media: dict[str, torch.Tensor] = {}
    images, videos = data.get("image") or [], data.get("video") or []
    images = images if isinstance(images, (list, tuple)) else [images]
    videos = videos if isinstance(videos, (list, tuple)) else [videos]
    if images:
        media.update(image_processor(list(images)))
    if videos:
        media.update(video_processor(list(videos)))
    inputs = expand_placeholders(token_ids, config, media.get("image_grid_thw"), media.get("video_grid_thw"))
    ids = inputs["input_ids"]
    vision = config.vision
    positions, delta = rope_positions(ids, inputs["mm_token_type_ids"], media.get("image_grid_thw"),
                                      media.get("video_grid_thw"), vision.spatial_merge_size,
                                      vision.temporal_merge_size)
    is_image, is_video = ids[0] == config.image_token_id, ids[0] == config.video_token_id
    rows = torch.full_like(ids[0], -1)
    rows[is_image] = torch.arange(int(is_image.sum()))
    rows[is_video] = int(is_image.sum()) + torch.arange(int(is_video.sum()))
    digest = hashlib.sha256()
    for key in sorted(media):
        digest.update(key.encode())
        digest.update(media[key].contiguous().numpy().tobytes())
    return ids[0].tolist(), MultimodalInputs(
        media=media,
        positions_3T=positions[:, 0],
        rope_delta=int(delta[0, 0]),
        rows_T=rows,
        moe_types_T=token_types(ids, config.vision_token_ids)[0],
        content_hash=digest.digest(),
    )


def split_content_parts(conversation: list[dict], config, tokenizer) -> tuple[list[dict], dict]:
    """OpenAI-style content parts -> (messages with text content, {"image": [...], "video": [...]}).

    Images become `Picture N:<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>` and videos
    `Video N:<|VIDEO_START|>...<|VIDEO_END|>` (numbered per conversation, as the VL chat template does), spelled
    with the tokenizer's own tokens for the config's ids. Parts: {"type": "text"}, {"type": "image_url", "image_url":
    {"url": ...}} / {"type": "video_url", "video_url": {"url": ...}} (URL, path or data: URI) or {"type": "image",
    "image": PIL image or path} / {"type": "video", "video": frames or path}."""

    def token(token_id: int) -> str:
        text = tokenizer.convert_ids_to_tokens(token_id)
        if not text:
            raise ValueError(f"the tokenizer has no token for id {token_id} (VL special token from config.json)")
        return text

    image = token(config.image_start_token_id) + token(config.image_token_id) + token(config.image_end_token_id)
    video = token(config.video_start_token_id) + token(config.video_token_id) + token(config.video_end_token_id)
    data: dict[str, list] = {"image": [], "video": []}
    messages = []
    for message in conversation:
        content = message.get("content")
        if not isinstance(content, list):
            messages.append(message)
            continue
        pieces = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                pieces.append(part.get("text", ""))
            elif kind in ("image_url", "image", "video_url", "video"):
                media = "image" if kind.startswith("image") else "video"
                value = part.get(kind)
                source = value.get("url") if isinstance(value, dict) else value
                if source is None:
                    raise ValueError(f"a {kind} content part needs a source ({kind}: {{'url': ...}})")
                data[media].append(source)
                label = "Picture" if media == "image" else "Video"
                pieces.append(f"{label} {len(data[media])}:" + (image if media == "image" else video))
            else:
                raise ValueError(f"unsupported content part type {kind!r} (text, image_url, video_url, image, video)")
        messages.append({**message, "content": "".join(pieces)})
    return messages, {k: v for k, v in data.items() if v}


def vl_step_inputs(model, batch, ids_1N: torch.Tensor) -> ModelInputs:
    """A VL model's inputs for one engine step (`batch`: a ScheduledBatch, `ids_1N` its flattened tokens): vision
    embeddings placed at this step's placeholder tokens, 3-D positions, routing types.

    Prompt tokens take the request's precomputed rows / positions / types, so any chunk boundary is exact;
    generated tokens sit at t + rope_delta on all axes and route as text (as in transformers' decode)."""
    device = ids_1N.device
    x_1NH = model.embed_input_ids(ids_1N)
    positions, types, q_start = [], [], 0
    for request, num_new in batch.requests:
        start, end = request.num_computed_tokens, request.num_computed_tokens + num_new
        mm, prompt_end = request.mm, min(end, request.num_prompt_tokens)
        delta = mm.rope_delta if mm is not None else 0
        if mm is not None and start < prompt_end:
            positions.append(mm.positions_3T[:, start:prompt_end])
            types.append(mm.moe_types_T[start:prompt_end])
            rows = mm.rows_T[start:prompt_end]
            local = (rows >= 0).nonzero().squeeze(-1)
            if local.numel():
                x_1NH[0, q_start + local.to(device)] = mm.encode(model)[rows[local].to(device)]
            gen_start = prompt_end
        else:
            gen_start = start
        if gen_start < end:
            positions.append((torch.arange(gen_start, end) + delta).expand(3, -1))
            types.append(torch.zeros(end - gen_start, dtype=torch.long))
        q_start += num_new
    pos_31N = torch.cat(positions, dim=1)[:, None].to(device)
    types_1N = torch.cat(types)[None].to(device)
    return ModelInputs(ids_1N, pos_31N, inputs_embeds=x_1NH, moe_token_types=types_1N)
