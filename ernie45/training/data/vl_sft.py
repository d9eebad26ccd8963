"""VL-SFT data: multimodal chatml jsonl -> model inputs with an assistant-only loss mask.

A line is `{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.png"}},
{"type": "text", "text": "..."}]}, {"role": "assistant", "content": "..."}]}`; content is a string or a list of
parts (text, image_url / video_url with a path, http(s) URL or data: URI, or the short forms image / video; a
video may also be a list of frame images; video files are decoded with PyAV).
Relative paths are read from the data file's folder. Images sit in system / user turns only; each becomes
`Picture N:<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>` (as at inference), the placeholder repeated once per
merged patch. A malformed line or an unusable image raises `DataError` naming file:line.
Legend: T tokens of one sample, B rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ...engine.multimodal import split_content_parts
from ...models.vl_positions import IMAGE, VIDEO, rope_positions, token_types
from ...processing import MediaError
from .encode import Encoder
from .readers import Conversation, DataError, ReadStats, _jsonl_lines

_ROLES = ("system", "user", "assistant")
_MEDIA_PARTS = ("image_url", "image", "video_url", "video")


@dataclass
class VLRecord:
    where: str
    """file:line of the record."""
    messages: list[dict]
    """Chat messages; media sources already resolved to absolute paths, URLs or data: URIs."""
    train: list[bool]
    """One flag per assistant message (`"loss": false` on a message turns its loss off)."""


@dataclass
class VLSample:
    input_ids_T: torch.Tensor
    loss_mask_T: torch.Tensor
    """loss_mask[t]: token t is a target (assistant response tokens only)."""
    positions_3T: torch.Tensor
    """3-D RoPE positions (t, h, w)."""
    moe_types_T: torch.Tensor
    """0 text, non-zero vision (placeholders and image/video start/end): which expert set a token routes to."""
    media: dict[str, torch.Tensor]
    """pixel_values / image_grid_thw / pixel_values_videos / video_grid_thw (those present)."""


def _resolve(source, base: Path, index: int, kind: str):
    if kind.startswith("video") and isinstance(source, list) and source:  # a video given as its frames
        return [_resolve(frame, base, index, kind) for frame in source]
    if not isinstance(source, str) or not source:
        raise ValueError(f"messages[{index}]: a {kind} part needs a non-empty string source"
                         + (" (or, for a video, a list of frame images)" if kind.startswith("video") else ""))
    if source.startswith(("data:", "http://", "https://")):
        return source
    path = Path(source).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise ValueError(f"messages[{index}]: {kind} file {source!r} not found (looked at {path})")
    return str(path)


def _parse(obj, base: Path, where: str) -> VLRecord:
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")  # noqa: TRY004 (reported as a data error)
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("field 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            role = m.get("role") if isinstance(m, dict) else None
            raise ValueError(f"messages[{i}].role is {role!r}; must be one of {', '.join(_ROLES)}")
        content = m.get("content")
        if isinstance(content, str):
            out.append(m)
            continue
        if not isinstance(content, list):
            raise ValueError(f"messages[{i}].content must be a string or a list of parts")  # noqa: TRY004
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"messages[{i}]: a text part needs a string 'text'")
                parts.append(part)
            elif kind in _MEDIA_PARTS:
                if m["role"] == "assistant":
                    raise ValueError(f"messages[{i}]: images and videos belong in user or system turns, not assistant")
                value = part.get(kind)
                source = value.get("url") if isinstance(value, dict) else value
                parts.append({"type": kind, kind: _resolve(source, base, i, kind)})
            else:
                raise ValueError(f"messages[{i}]: unsupported content part type {kind!r} "
                                 f"(text, {', '.join(_MEDIA_PARTS)})")
        out.append({**m, "content": parts})
    train = [bool(m.get("loss", True)) for m in out if m["role"] == "assistant"]
    if not train:
        raise ValueError("'messages' has no assistant turn to train on")
    return VLRecord(where, out, train)


def read_vl_records(path: str | Path, skip_bad_lines: bool = False, stats: ReadStats | None = None) -> list[VLRecord]:
    """All records of a multimodal chatml .jsonl file; the first malformed line (bad JSON or schema, a missing
    media file) raises DataError (file:line), or with `skip_bad_lines` is skipped and counted in `stats`. An
    undecodable image is found when the sample is encoded (VLEncoder.encode raises, naming the line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found")
    if path.suffix != ".jsonl":
        raise DataError(f"{path}: VL-SFT data must be a .jsonl file of chatml messages")
    stats = stats if stats is not None else ReadStats()
    records = []
    for n, item in _jsonl_lines(path):
        where = f"{path}:{n}"
        stats.lines += 1
        try:
            if isinstance(item, Exception):
                raise ValueError(f"not valid JSON: {item}")  # noqa: TRY004 (reported as a data error)
            records.append(_parse(item, path.parent, where))
        except ValueError as exc:
            if skip_bad_lines:
                stats.skipped += 1
                continue
            raise DataError(f"{where}: {exc} (VL-SFT chatml; set skip_bad_lines: true to skip such lines)") from None
    return records


class VLEncoder:
    """Encodes VL records for one checkpoint: its tokenizer, chat template, processors and VL config."""

    def __init__(self, tokenizer, config, image_processor, video_processor, max_seq_len: int):
        self.tok = tokenizer
        self.config = config
        self.image_processor = image_processor
        self.video_processor = video_processor
        self.max_seq_len = max_seq_len
        # No truncation while rendering: a cut could split an image's placeholders; long samples are an error.
        self.text = Encoder(tokenizer, max_seq_len=1 << 30)

    def encode(self, record: VLRecord) -> VLSample:
        try:
            return self._encode(record)
        except (MediaError, ValueError) as exc:
            raise DataError(f"{record.where}: {exc} (VL-SFT chatml)") from None

    def _encode(self, record: VLRecord) -> VLSample:
        cfg = self.config
        messages, data = split_content_parts(record.messages, cfg, self.tok)
        samples = self.text.conversation(Conversation(messages, record.train))
        if not samples:
            raise ValueError("no assistant token carries loss")
        ids, mask = samples[0].ids, samples[0].loss_mask
        media: dict[str, torch.Tensor] = {}
        if data.get("image"):
            media.update(self.image_processor(data["image"]))
        if data.get("video"):
            media.update(self.video_processor(data["video"]))
        merge = cfg.vision.spatial_merge_size ** 2
        counts = {cfg.image_token_id: iter([]), cfg.video_token_id: iter([])}
        if "image_grid_thw" in media:
            counts[cfg.image_token_id] = iter((media["image_grid_thw"].prod(-1) // merge).tolist())
        if "video_grid_thw" in media:
            per_video = media["video_grid_thw"].prod(-1) // merge // cfg.vision.temporal_merge_size
            counts[cfg.video_token_id] = iter(per_video.tolist())
        out_ids: list[int] = []
        out_mask: list[bool] = []
        for token, target in zip(ids, mask):
            if token in counts:
                n = next(counts[token], None)
                if n is None:
                    raise ValueError("the text itself contains an image/video placeholder token; remove it")
                if target:
                    raise ValueError("an image/video placeholder inside an assistant response cannot be a target")
                out_ids += [token] * n
                out_mask += [False] * n
            else:
                out_ids.append(token)
                out_mask.append(target)
        if any(next(rest, None) is not None for rest in counts.values()):
            raise ValueError("the chat template dropped an image/video placeholder; it cannot be trained on")
        if len(out_ids) > self.max_seq_len:
            raise ValueError(f"the sample has {len(out_ids)} tokens with its images expanded, more than max_seq_len "
                             f"{self.max_seq_len} (images cannot be cut; raise max_seq_len or shrink the images)")
        ids_1T = torch.tensor([out_ids], dtype=torch.long)
        mm_types = token_types(ids_1T, {cfg.image_token_id: IMAGE, cfg.video_token_id: VIDEO})
        positions, _ = rope_positions(ids_1T, mm_types, media.get("image_grid_thw"), media.get("video_grid_thw"),
                                      cfg.vision.spatial_merge_size, cfg.vision.temporal_merge_size, None)
        return VLSample(ids_1T[0], torch.tensor(out_mask), positions[:, 0], token_types(ids_1T, cfg.vision_token_ids)[0],
                        media)


def collate_vl(samples: list[VLSample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded rows [B, T]; segment_ids 0 on tokens, -1 on padding; media concatenated in row order (the
    order in which the model scatters vision embeddings into the placeholders)."""
    T = max(len(s.input_ids_T) for s in samples)
    B = len(samples)
    batch = {
        "input_ids": torch.full((B, T), pad_id, dtype=torch.long),
        "loss_mask": torch.zeros(B, T, dtype=torch.bool),
        "segment_ids": torch.full((B, T), -1, dtype=torch.long),
        "positions": torch.zeros(3, B, T, dtype=torch.long),
        "moe_types": torch.zeros(B, T, dtype=torch.long),
    }
    for b, s in enumerate(samples):
        n = len(s.input_ids_T)
        batch["input_ids"][b, :n] = s.input_ids_T
        batch["loss_mask"][b, :n] = s.loss_mask_T
        batch["segment_ids"][b, :n] = 0
        batch["positions"][:, b, :n] = s.positions_3T
        batch["moe_types"][b, :n] = s.moe_types_T
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [s.media[key] for s in samples if key in s.media]
        if parts:
            batch[key] = torch.cat(parts)
    return batch
