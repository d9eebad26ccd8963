"""Benchmark prompts: random token ids of a given length, or ShareGPT-format conversations (json or jsonl).

Both need a tokenizer to count tokens: a local one (`ernie45.load_tokenizer(PATH)`, or any object with
`encode(text) -> list[int]` and `decode(ids) -> str`), or the server's own /tokenize and /detokenize
(`ServerTokenizer`; ernie45 serve and vLLM both have them).
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass
class SampleRequest:
    """One benchmark request: token ids go to /v1/completions as they are; chat endpoints get the decoded text."""

    prompt: str | list[int]
    prompt_len: int
    expected_output_len: int


class ServerTokenizer:
    """The server's /tokenize and /detokenize as a Tokenizer, so a remote benchmark needs no local files."""

    def __init__(self, base_url: str, model: str, headers: dict[str, str] | None = None, timeout: float = 60.0):
        import httpx  # the serving client's dependency; the offline benchmarks never need it

        self._errors = httpx.HTTPError
        self._client = httpx.Client(base_url=base_url, headers=headers or {}, timeout=timeout)
        self._model = model

    def _post(self, path: str, body: dict) -> dict:
        try:
            response = self._client.post(path, json={"model": self._model, **body})
        except self._errors as exc:
            raise ConnectionError(f"{self._client.base_url}{path}: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            raise ConnectionError(f"{self._client.base_url}{path} answered {response.status_code}: "
                                  f"{response.text[:300]} (pass --tokenizer PATH to count tokens locally)")
        return response.json()

    def encode(self, text: str) -> list[int]:
        return self._post("/tokenize", {"prompt": text, "add_special_tokens": False})["tokens"]

    def decode(self, ids: list[int]) -> str:
        return self._post("/detokenize", {"tokens": ids})["prompt"]

    def close(self) -> None:
        self._client.close()


# A mixed English / Chinese word list: its token ids are ones the tokenizer really produces (ids drawn uniformly
# from a vocabulary include pieces that never occur in text, which random-weight checkpoints then echo back).
_WORDS = ("model", "token", "reads", "writes", "the", "next", "answer", "short", "test", "stream", "engine", "batch",
          "cache", "prefix", "a", "of", "to", "and", "river", "mountain", "light", "number", "small", "large", "quick",
          "模型", "学习", "数据", "计算", "文本", "问题", "回答", "时间")


def random_requests(tokenizer: Tokenizer, num_requests: int, input_len: int, output_len: int,
                    range_ratio: float = 0.0, prefix_len: int = 0, seed: int = 0,
                    as_text: bool = False) -> list[SampleRequest]:
    """vLLM's random dataset: input/output lengths uniform in [len * (1 - range_ratio), len * (1 + range_ratio)],
    a shared random prefix of `prefix_len` tokens, token ids shuffled per request so the prefix cache cannot
    help past the shared prefix. `as_text`: decode the ids (for chat endpoints; the count is then re-measured)."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"random range ratio must be in [0, 1), got {range_ratio}")
    if input_len < 1 or output_len < 1 or prefix_len < 0:
        raise ValueError(f"random input/output lengths must be >= 1 and the prefix >= 0, got {input_len}, "
                         f"{output_len}, {prefix_len}")
    rng = random.Random(seed)
    pool = tokenizer.encode(" ".join(rng.choice(_WORDS) for _ in range(2000)))
    prefix = [rng.choice(pool) for _ in range(prefix_len)]
    requests = []
    for _ in range(num_requests):
        n_in = rng.randint(max(1, int(input_len * (1 - range_ratio))), int(input_len * (1 + range_ratio)))
        n_out = rng.randint(max(1, int(output_len * (1 - range_ratio))), int(output_len * (1 + range_ratio)))
        ids = prefix + [rng.choice(pool) for _ in range(n_in)]
        if as_text:
            text = tokenizer.decode(ids)
            requests.append(SampleRequest(text, len(tokenizer.encode(text)), n_out))
        else:
            requests.append(SampleRequest(ids, len(ids), n_out))
    return requests


def load_sharegpt(path: str | Path) -> list[list[str]]:
    """The turns' texts of each conversation of a ShareGPT-format file: a JSON list, or JSON lines, of
    {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]} (OpenAI-style
    {"role", "content"} turns and a "messages" key are read too)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        entries = data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        entries = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: neither a JSON document nor JSON lines ({exc})") from None
    conversations = []
    for entry in entries:
        turns = entry.get("conversations") or entry.get("conversation") or entry.get("messages") or []
        texts = [t.get("value", t.get("content")) for t in turns if isinstance(t, dict)]
        conversations.append([t for t in texts if isinstance(t, str)])
    return conversations


def sharegpt_requests(path: str | Path, tokenizer: Tokenizer, num_requests: int, output_len: int | None = None,
                      seed: int = 0) -> list[SampleRequest]:
    """vLLM's ShareGPT sampling: shuffle, take each conversation's first turn as the prompt and the second's length
    as the output length (or `output_len`), skip pairs under 4 tokens and prompts over 1,024 or 2,048 tokens in
    all; when the file has fewer usable pairs than asked, repeat them (and say so on stderr)."""
    conversations = [c for c in load_sharegpt(path) if len(c) >= 2]
    if not conversations:
        raise ValueError(f"{path}: no conversation with at least two turns (a prompt and an answer)")
    random.Random(seed).shuffle(conversations)
    requests = []
    for turns in conversations:
        if len(requests) == num_requests:
            break
        prompt_len = len(tokenizer.encode(turns[0]))
        n_out = output_len if output_len is not None else len(tokenizer.encode(turns[1]))
        too_short = prompt_len < 4 or (output_len is None and n_out < 4)
        if too_short or prompt_len > 1024 or prompt_len + n_out > 2048:
            continue
        requests.append(SampleRequest(turns[0], prompt_len, n_out))
    if not requests:
        raise ValueError(f"{path}: every conversation was filtered out (prompt or answer under 4 tokens, prompt over "
                         "1,024 or prompt + answer over 2,048 tokens)")
    if len(requests) < num_requests:
        print(f"{path}: {len(requests)} usable prompts for {num_requests} requests; repeating them",
              file=sys.stderr)
        requests = [requests[i % len(requests)] for i in range(num_requests)]
    return requests
