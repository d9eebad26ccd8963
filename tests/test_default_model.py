"""The embedded default model (built by recipes/tiny): shipped, small, loads, tokenizes both languages, answers
from the CLI with no model given, and solves held-out arithmetic about as well as recipes/tiny/RESULTS.md says."""

import subprocess
import sys

import pytest

from ernie45 import LLM, SamplingParams, load_model, load_tokenizer
from ernie45.default_model import DEFAULT_MODEL_DIR, default_model_path
from recipes.tiny.tasks import extract_answer, generate
from recipes.tiny.tokenizer import chat_template

MAX_BYTES = 30 * 10**6
# Held-out addition, thinking on, greedy: the DPO model's accuracy in RESULTS.md, and the floor this test allows
# on its smaller sample (about 3 standard errors below the measured figure).
REPORTED_ADDITION_THINKING = None
FLOOR = None


def test_the_package_ships_the_model():
    assert default_model_path() == DEFAULT_MODEL_DIR
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
                 "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        assert (DEFAULT_MODEL_DIR / name).is_file(), name


def test_total_size_is_at_most_30_mb():
    assert sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.rglob("*") if p.is_file()) <= MAX_BYTES


def test_it_loads_as_an_ernie45_moe_with_shared_experts():
    model = load_model(DEFAULT_MODEL_DIR)
    cfg = model.config
    assert cfg.model_type == "ernie4_5_moe" and cfg.moe_num_shared_experts >= 1 and cfg.moe_k == 2
    assert not cfg.is_moe_layer(0) and cfg.is_moe_layer(cfg.num_hidden_layers - 1)
    assert str(model.dtype) == "torch.bfloat16"


def test_tokenizer_round_trips_english_and_chinese():
    tok = load_tokenizer(DEFAULT_MODEL_DIR)
    assert tok.chat_template == chat_template()
    for text in ("What is 347 + 85? Hello, world!", "床前明月光，疑是地上霜。举头望明月，低头思故乡。", "混合 mixed 文本 😀 龘"):
        assert tok.decode(tok.encode(text)) == text
    assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    assert tok.token_to_id("<think>") is not None and tok.token_to_id("<|end_of_sentence|>") is not None


def test_generate_with_no_model_argument_produces_text():
    out = subprocess.run([sys.executable, "-m", "ernie45.cli.main", "generate", "--prompt", "What is 12 + 34?",
                          "--chat", "--temperature", "0", "--max-new-tokens", "24"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


@pytest.mark.skipif(REPORTED_ADDITION_THINKING is None, reason="no accuracy reported yet")
def test_held_out_addition_is_answered_at_the_reported_accuracy():
    problems = [p for p in generate(120, seed=1234 + 4, heldout=True) if p.task == "addition"][:24]
    llm = LLM(dtype="float32", max_num_seqs=32)
    outputs = llm.chat([[{"role": "user", "content": p.question}] for p in problems],
                       SamplingParams(temperature=0.0, max_tokens=160), use_tqdm=False,
                       chat_template_kwargs={"enable_thinking": True})
    correct = sum(extract_answer(o.outputs[0].text) == p.answer for p, o in zip(problems, outputs))
    assert correct / len(problems) >= FLOOR
