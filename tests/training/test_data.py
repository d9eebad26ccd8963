import json

import pytest
import torch

from ernie45.tokenizer import BUILTIN_ERNIE45_THINKING_CHAT_TEMPLATE, load_tokenizer
from ernie45.tokenizer.testing import build_tiny_sentencepiece_tokenizer
from ernie45.training.data import DataError, Encoder, ReadStats, Sample, collate, pack, read_records
from ernie45.training.data.readers import Conversation, Preference

from .helpers import write_jsonl


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(build_tiny_sentencepiece_tokenizer(tmp_path_factory.mktemp("tok")))


def trained_text(tok, sample):
    return tok.decode([i for i, m in zip(sample.ids, sample.loss_mask) if m])


def test_erniekit_sft_loss_only_on_assistant_turns_with_label(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"system": "be brief", "src": ["hi", "what color"], "tgt": ["hello", "blue"],
                                             "label": [0, 1]}])
    [(where, conv)] = list(read_records(path, "erniekit", "SFT"))
    assert where.endswith("d.jsonl:1") and [m["role"] for m in conv.messages] == ["system", "user", "assistant", "user", "assistant"]
    [sample] = Encoder(tok, 256).encode(conv)
    assert trained_text(tok, sample) == "blue<|end_of_sentence|>"  # turn 1 has label 0
    full = tok.apply_chat_template(conv.messages, add_generation_prompt=False)
    assert tok.decode(sample.ids) == full


def test_alpaca_and_chatml_with_tool_and_think(tmp_path, tok):
    alp = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "add", "input": "1 2", "output": "3", "history": [["q", "a"]]}])
    [(_, conv)] = list(read_records(alp, "alpaca", "SFT"))
    assert trained_text(tok, Encoder(tok, 256).encode(conv)[0]) == "a<|end_of_sentence|>3<|end_of_sentence|>"
    msgs = [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "w", "arguments": {}}}]},
        {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "<think>\nit is sunny\n</think>\n\nSunny."}]
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}])
    [(_, conv)] = list(read_records(chat, "chatml", "SFT"))
    assert conv.train == [True, True]
    thinking = load_tokenizer(build_tiny_sentencepiece_tokenizer(tmp_path / "think", BUILTIN_ERNIE45_THINKING_CHAT_TEMPLATE))
    [sample] = Encoder(thinking, 512).encode(Conversation(msgs[:1] + msgs[3:], [True]))
    text = trained_text(thinking, sample)
    assert "it is sunny" in text and "Sunny." in text and "weather" not in text


def test_dpo_formats(tmp_path, tok):
    ek = write_jsonl(tmp_path / "e.jsonl", [{"src": ["q"], "tgt": [], "response": [["bad"], ["good"]], "sort": [0, 1]}])
    [(_, pref)] = list(read_records(ek, "erniekit", "DPO"))
    assert isinstance(pref, Preference) and (pref.chosen, pref.rejected) == ("good", "bad")
    al = write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "chosen": "c", "rejected": "r"}])
    [(_, pref)] = list(read_records(al, "alpaca", "DPO"))
    pair = Encoder(tok, 64).preference(pref)
    assert tok.decode(pair.chosen) == "c<|end_of_sentence|>" and tok.decode(pair.rejected) == "r<|end_of_sentence|>"
    assert tok.decode(pair.prompt).endswith("Assistant: ")


def test_bad_line_names_file_and_line_or_is_skipped_and_counted(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"src": ["a"], "tgt": ["b"]}) + "\n{not json\n" + json.dumps({"src": ["a"]}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        list(read_records(path, "erniekit", "SFT"))
    stats = ReadStats()
    records = list(read_records(path, "erniekit", "SFT", skip_bad_lines=True, stats=stats))
    assert len(records) == 1 and stats.skipped == 2 and stats.lines == 3
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"src": ["a"], "tgt": ["b"]}) + "\n\n" + json.dumps({"src": ["a"]}) + "\n")
    with pytest.raises(DataError, match=r"missing\.jsonl:3: field 'tgt' must be a non-empty list of strings"):
        list(read_records(missing, "erniekit", "SFT"))


def test_pack_segments_and_positions():
    a, b, c = Sample([1, 2, 3], [False, True, True]), Sample([4, 5], [True, True]), Sample([6, 7, 8, 9], [False] + [True] * 3)
    packed = pack([a, b, c], max_seq_len=6)
    assert [p.ids for p in packed] == [[1, 2, 3, 4, 5], [6, 7, 8, 9]]
    assert packed[0].segment_ids == [0, 0, 0, 1, 1] and packed[0].positions == [0, 1, 2, 0, 1]
    assert packed[0].loss_mask == [False, True, True, False, True]  # a sample's first token is never a target
    batch = collate(packed, pad_id=0)
    assert batch["segment_ids"][1].tolist() == [0, 0, 0, 0, -1] and not batch["loss_mask"][1, -1]
    assert batch["input_ids"].shape == torch.Size([2, 5])


def test_every_epoch_serves_full_batches_though_packing_varies_per_epoch(tmp_path, tok):
    """Packing a reshuffled epoch gives a different number of sequences each time; steps_per_epoch is counted on
    epoch 0, so a shorter epoch must still fill its last batch (it wraps around to its own first sequences)."""
    from ernie45.training.data import TrainData

    from .helpers import make_config

    rows = [{"src": [f"q{i} " + "word " * ((i * 7919) % 23)], "tgt": [f"a{i} " + "x " * ((i * 104729) % 17)]}
            for i in range(120)]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    cfg = make_config(tmp_path, tmp_path / "out", data, max_seq_len=64, batch_size=1)
    train = TrainData(cfg, Encoder(tok, cfg.max_seq_len), 0, world_size=1)
    steps, train.steps_per_epoch = train.steps_per_epoch, 0  # 0: no wrap-around, the raw packed epochs
    raw_sizes = [len(train.epoch_units(epoch)) for epoch in range(6)]
    train.steps_per_epoch, train._epoch_cache = steps, None
    assert min(raw_sizes) < steps * cfg.batch_size  # the case this guards: an epoch shorter than epoch 0's steps
    for step in range(6 * train.steps_per_epoch):
        (batch,) = train.micro_batches(step, rank=0)
        assert batch["input_ids"].shape[0] == cfg.batch_size, step
