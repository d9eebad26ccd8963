"""Input processing, done once, in the client's process: prompt -> token ids (checked against the vocabulary and
max_model_len), and a VL prompt's media -> expanded placeholders, processed pixels and 3-D positions.

It needs the tokenizer and the model's config, never the model, so the server and `LLM` run it without touching the
engine core (which may live in another process); the core receives prompts as `EnginePrompt`s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..models.registry import spec_for
from .multimodal import MultimodalInputs, prepare_multimodal


@dataclass
class EnginePrompt:
    """A processed prompt, ready for the engine core."""

    prompt_token_ids: list[int]
    prompt: str | None = None
    """The prompt's text when it came as text (echoed in outputs)."""
    multi_modal_inputs: MultimodalInputs | None = None


class InputProcessor:
    def __init__(self, tokenizer, model_config, max_model_len: int, source_dir: str | Path | None = None):
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.max_model_len = max_model_len
        self.source_dir = source_dir
        self.is_multimodal = spec_for(model_config).is_multimodal
        self._processors = None  # VL image / video processors, loaded on the first multimodal prompt

    def tokenize_prompt(self, prompt) -> tuple[str | None, list[int]]:
        """A prompt is a string or {"prompt_token_ids": [...]} (or {"prompt": str})."""
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, EnginePrompt):
            return prompt.prompt, prompt.prompt_token_ids
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
                raise ValueError("prompt_token_ids must be a list of integers")
            vocab = self.model_config.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt_token_ids contains ids outside the vocabulary [0, {vocab}): {bad[:5]}")
            return prompt.get("prompt"), list(ids)
        if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
            return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        raise ValueError(f"a prompt must be a string or {{'prompt_token_ids': [...]}}, got {type(prompt).__name__}")

    def validate_prompt(self, prompt) -> tuple[str | None, list[int]]:
        """Tokenize and check a prompt (no engine state: safe from any thread)."""
        text, ids = self.tokenize_prompt(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        self._check_length(len(ids), "")
        return text, ids

    def _check_length(self, num_tokens: int, what: str) -> None:
        if num_tokens >= self.max_model_len:
            raise ValueError(
                f"the prompt has {num_tokens} tokens{what}, but max_model_len is {self.max_model_len} "
                f"(prompt + at least one generated token must fit)"
            )

    def prepare_multimodal(self, ids: list[int], data: dict) -> tuple[list[int], MultimodalInputs]:
        """Expand a VL prompt's placeholders and process its media (processors read from the checkpoint)."""
        if not self.is_multimodal:
            raise ValueError("multi_modal_data needs a VL model (model_type ernie4_5_vl_moe)")
        from ..processing import ImageProcessor, VideoProcessor, load_processors  # needs pillow: the `vl` extra

        if self._processors is None:
            source = self.source_dir
            self._processors = load_processors(source) if source is not None else (ImageProcessor(), VideoProcessor())
        ids, mm = prepare_multimodal(self.model_config, *self._processors, ids, data)
        self._check_length(len(ids), " with its images / videos expanded")
        return ids, mm

    def process(self, prompt) -> EnginePrompt:
        """Any accepted prompt form -> EnginePrompt. VL prompts may add "multi_modal_data" (raw media) or
        "multi_modal_inputs" (from `prepare_multimodal`, ids already expanded)."""
        if isinstance(prompt, EnginePrompt):
            return prompt
        text, ids = self.validate_prompt(prompt)
        mm = prompt.get("multi_modal_inputs") if isinstance(prompt, dict) else None
        data = prompt.get("multi_modal_data") if isinstance(prompt, dict) else None
        if data and mm is None:
            ids, mm = self.prepare_multimodal(ids, data)
        return EnginePrompt(ids, text, mm)
