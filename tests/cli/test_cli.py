"""The `ernie45` console script, run as a real subprocess on a tiny checkpoint."""

import subprocess
import sys

import pytest
import torch

import ernie45
from ernie45.generation.generate import GenerationConfig
from ernie45.generation.text import stop_ids_for, stream_text

from ..tiny_checkpoint import make_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("cli") / "tiny")


def ernie45_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "ernie45.cli.main", *args], input=stdin, capture_output=True,
                          text=True, timeout=120)


def expected_text(checkpoint, prompt_text, n):
    model, tok = ernie45.load_model(checkpoint), ernie45.load_tokenizer(checkpoint)
    cfg = GenerationConfig(max_new_tokens=n, stop_token_ids=stop_ids_for(tok, model))
    return "".join(stream_text(model, tok, tok.encode(prompt_text), cfg))


def test_generate_streams_the_greedy_completion(checkpoint):
    out = ernie45_cli("generate", str(checkpoint), "--prompt", "The model reads", "--temperature", "0",
                      "--max-new-tokens", "12")
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected_text(checkpoint, "The model reads", 12) + "\n"
    assert len(out.stdout.strip()) > 0


def test_generate_with_seed_is_reproducible(checkpoint):
    args = ("generate", str(checkpoint), "--prompt", "模型", "--temperature", "1.0", "--top-k", "20", "--seed", "7",
            "--max-new-tokens", "10")
    first, second = ernie45_cli(*args), ernie45_cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout


def test_chat_multi_turn_with_thinking_toggle(checkpoint):
    out = ernie45_cli("chat", str(checkpoint), "--temperature", "0", "--max-new-tokens", "6", "--system", "Be brief.",
                      stdin="hello\n/think on\nwhat next?\n/reset\n/bogus\n/exit\n")
    assert out.returncode == 0, out.stderr
    assert "(thinking on)" in out.stderr and "(conversation cleared)" in out.stderr
    assert "unknown command '/bogus'" in out.stderr
    assert out.stdout.count("\n") == 2  # two answers


def test_errors_are_clear(tmp_path, checkpoint):
    missing = ernie45_cli("generate", str(tmp_path), "--prompt", "x")
    assert missing.returncode == 1 and "config.json not found" in missing.stderr
    bad = ernie45_cli("generate", str(checkpoint), "--prompt", "x", "--top-p", "0")
    assert bad.returncode == 1 and "top_p must be in (0, 1]" in bad.stderr
    bad_queue = ernie45_cli("serve", str(checkpoint), "--max-queue", "0")
    assert bad_queue.returncode == 1 and "--max-queue must be >= 1" in bad_queue.stderr


def test_stream_text_stops_at_stop_token(checkpoint):
    model, tok = ernie45.load_model(checkpoint), ernie45.load_tokenizer(checkpoint)
    ids = tok.encode("hello")
    with torch.no_grad():
        first = int(model(torch.tensor([ids]))[0, -1].argmax())
    cfg = GenerationConfig(max_new_tokens=5, stop_token_ids=(first,))
    assert list(stream_text(model, tok, ids, cfg)) == []
