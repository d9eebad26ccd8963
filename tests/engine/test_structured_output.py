"""Grammar-constrained decoding in the engine: the backend's grammars, the engine against a plain model constrained
by the same grammar (batching, chunked prefill, preemption, prefix caching, n > 1), and the refusals."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
import xgrammar
from xgrammar.testing import _is_grammar_accept_string as grammar_accepts

import ernie45
from ernie45.engine import EngineConfig, LLMEngine, SamplingParams
from ernie45.engine.structured_output import StructuredOutputsParams, apply_token_bitmask
from ernie45.engine.structured_output.json_schema import UNENFORCED_KEYWORDS
from ernie45.engine.structured_output.tool_calls import forced_tool_call_tag
from ernie45.engine.structured_output.xgrammar_backend import XgrammarBackend, _grammar
from ernie45.generation.text import stop_ids_for

from .test_engine_vs_model import SETTINGS, mixed_prompts, run_engine

SCHEMA = {"type": "object", "properties": {
    "id": {"type": "integer", "minimum": 0, "maximum": 999},
    "label": {"type": "string", "maxLength": 6},
    "kind": {"enum": ["a", "b"]},
    "items": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
    "required": ["id", "label", "kind", "items"]}
# Each keyword with a schema using it and an instance violating only it (JSON text).
VIOLATIONS = {
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1, 1]"),
    "contains": ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 1}}, "[2]"),
    "minContains": ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 1}, "minContains": 2},
                    "[1, 2]"),
    "maxContains": ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 1}, "maxContains": 1},
                    "[1, 1]"),
    "not": ({"type": "integer", "not": {"const": 1}}, "1"),
    "if": ({"type": "integer", "if": {"minimum": 1}, "then": {"maximum": 3}}, "5"),
    "dependentRequired": ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                           "dependentRequired": {"a": ["b"]}}, '{"a": 1}'),
    "dependentSchemas": ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                          "dependentSchemas": {"a": {"required": ["b"]}}}, '{"a": 1}'),
}


@pytest.fixture(scope="module")
def dense(tiny_dense_checkpoint):
    return ernie45.load_model(tiny_dense_checkpoint), ernie45.load_tokenizer(tiny_dense_checkpoint)


@pytest.fixture(scope="module")
def backend(dense):
    model, tok = dense
    return XgrammarBackend(tok, model.config.vocab_size, sorted(set(stop_ids_for(tok, model))))  # as the engine


# ------------------------------------------------------------------------------------------- grammars


def test_every_refused_keyword_is_one_xgrammar_does_not_enforce():
    assert set(VIOLATIONS) == set(UNENFORCED_KEYWORDS)
    for keyword, (schema, bad) in VIOLATIONS.items():
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(json.loads(bad), schema)
        assert grammar_accepts(xgrammar.Grammar.from_json_schema(json.dumps(schema)), bad), (
            f"xgrammar now enforces {keyword!r}: drop it from UNENFORCED_KEYWORDS")
        nested = {"type": "object", "properties": {"x": schema}}
        refused = "contains" if "contains" in schema else keyword  # min/maxContains come with contains
        with pytest.raises(ValueError, match=rf"uses '{refused}' at #/properties/x"):
            StructuredOutputsParams(json=nested)


def test_json_strings_are_valid_json_and_valid_utf8(backend, dense):
    _, tok = dense
    for schema in ({"type": "string", "maxLength": 4}, {"type": "string"}):
        grammar = _grammar(StructuredOutputsParams(json=schema))
        assert grammar_accepts(grammar, '"ab"') and not grammar_accepts(grammar, '"a\tb"')
        matcher = backend.grammar_for(StructuredOutputsParams(json=schema))
        byte = [tok.token_to_id(f"<0x{b:02X}>") for b in (0x22, 0xED, 0xA0)]  # '"' then a UTF-8 surrogate lead
        assert matcher.accept_token(byte[0]) and matcher.accept_token(byte[1])
        assert not matcher.accept_token(byte[2]), "UTF-8-encoded surrogates are not text"


def test_forced_tool_calls_parallel_or_one():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}]
    call = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    for parallel in (True, False):
        grammar = _grammar(StructuredOutputsParams(structural_tag=forced_tool_call_tag(tools, "required", parallel)))
        assert grammar_accepts(grammar, call)
        assert grammar_accepts(grammar, call + "\n" + call) == parallel
        assert not grammar_accepts(grammar, "")  # at least one call
        assert not grammar_accepts(grammar, call.replace('"x": 1', '"x": "1"'))
        assert not grammar_accepts(grammar, call.replace('"f"', '"g"'))


def test_rollback_restores_the_mask_and_compiles_are_cached(backend, dense):
    _, tok = dense
    params = StructuredOutputsParams(json=SCHEMA)
    grammar = backend.grammar_for(params)
    before = backend.allocate_bitmask(1)
    grammar.fill_bitmask(before, 0)
    ids = tok.encode('{"id": 12')
    assert all(grammar.accept_token(t) for t in ids)
    after = backend.allocate_bitmask(1)
    grammar.fill_bitmask(after, 0)
    assert not torch.equal(before, after)
    grammar.rollback(len(ids))
    again = backend.allocate_bitmask(1)
    grammar.fill_bitmask(again, 0)
    assert torch.equal(before, again)
    compiles = backend.num_compiles
    backend.grammar_for(StructuredOutputsParams(json=json.loads(json.dumps(SCHEMA))))
    assert backend.num_compiles == compiles and backend.num_cache_hits >= 1


def test_bitmask_application_matches_xgrammar_kernel(backend):
    grammar = backend.grammar_for(StructuredOutputsParams(regex="[0-9]+"))
    mask = backend.allocate_bitmask(1)
    grammar.fill_bitmask(mask, 0)
    logits = torch.randn(1, backend.vocab_size)
    ours, theirs = logits.clone(), logits.clone()
    apply_token_bitmask(ours, mask)
    xgrammar.apply_token_bitmask_inplace(theirs, mask)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize(("fields", "match"), [
    ({"json": {"type": "foo"}}, "json is not a valid JSON schema"),
    ({"json": "{not json"}, "json is not valid JSON"),
    ({"regex": "(a"}, "regex does not compile"),
    ({"grammar": 'root ::= "a" |'}, "grammar does not compile"),
    ({"choice": []}, "choice must be a non-empty list"),
    ({"regex": "a", "choice": ["a"]}, "exactly one of"),
    ({}, "exactly one of"),
    ({"json": {"type": "object", "allOf": [{"required": ["a"]}, {"required": ["b"]}]}}, "allOf"),
])
def test_bad_constraints_raise_naming_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(structured_outputs=fields)


# ------------------------------------------------------------------------------------------- engine


def constrained_reference(model, backend, prompt_ids, params: StructuredOutputsParams, steps: int) -> list[int]:
    """Cache-free greedy decoding of the plain model, each step masked by the grammar, until its stop token."""
    grammar = backend.grammar_for(params)
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids]))[0, -1:].float()
            mask = backend.allocate_bitmask(1)
            grammar.fill_bitmask(mask, 0)
            apply_token_bitmask(logits, mask)
            token = int(logits.argmax())
            assert grammar.accept_token(token)
            ids.append(token)
            if grammar.is_terminated():
                break
    return ids[len(prompt_ids):]


@pytest.mark.parametrize("drafts", [False, True])
@pytest.mark.parametrize("setting", SETTINGS)
def test_constrained_greedy_equals_plain_model_under_the_same_grammar(setting, drafts, dense, backend):
    """With n-gram drafts too: the grammar trims them, masks each verified position, and rolls back."""
    model, tok = dense
    spec = {"method": "ngram", "num_speculative_tokens": 3, "disable_by_batch_size": None} if drafts else None
    engine = LLMEngine(model, tok, EngineConfig(**SETTINGS[setting], speculative_config=spec))
    prompts = mixed_prompts(model.config.vocab_size, count=8)
    # Compact JSON: greedy on random weights can take the whitespace cap at every gap, which would need ~150 tokens.
    constraints = [StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True),
                   StructuredOutputsParams(regex="(ab|cd)[0-9]{2,4}"),
                   StructuredOutputsParams(choice=["left", "right"]), None]
    for i, ids in enumerate(prompts):
        so = constraints[i % len(constraints)]
        engine.add_request(str(i), {"prompt_token_ids": ids},
                           SamplingParams(temperature=0, max_tokens=120, structured_outputs=so))
    got = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                got[out.request_id] = out.outputs[0]
    for i, ids in enumerate(prompts):
        so = constraints[i % len(constraints)]
        if so is None:
            continue
        want = constrained_reference(model, backend, ids, so, 120)
        out = got[str(i)]
        assert out.token_ids == want, f"prompt {i} ({len(ids)} tokens)"
        assert out.finish_reason == "stop"
        if so.kind == "json":
            jsonschema.validate(json.loads(out.text), SCHEMA)
        elif so.kind == "regex":
            assert re.fullmatch("(ab|cd)[0-9]{2,4}", out.text)
        else:
            assert out.text in so.choice
    if setting == "tiny_kv_pool":
        assert engine.scheduler.num_preemptions > 0
    if drafts:
        assert engine.stats()["spec_decode_num_accepted_tokens"] > 0
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks


def test_unconstrained_rows_are_untouched_by_constrained_neighbours(dense):
    model, tok = dense
    prompts = mixed_prompts(model.config.vocab_size, count=6)
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    constrained = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                 structured_outputs={"regex": "[a-z]{12}"})
    alone = run_engine(LLMEngine(model, tok, EngineConfig()), prompts, free)
    engine = LLMEngine(model, tok, EngineConfig())
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": ids}, constrained if i % 2 else free)
    mixed = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                mixed[out.request_id] = out.outputs[0]
    for i in range(0, len(prompts), 2):
        assert mixed[str(i)].token_ids == alone[str(i)]
    for i in range(1, len(prompts), 2):
        assert re.fullmatch("[a-z]{12}", mixed[str(i)].text)


def test_sampled_n_sequences_each_follow_the_schema_and_thinking_stays_free(dense):
    model, tok = dense
    llm_engine = LLMEngine(model, tok, EngineConfig())
    think_open = tok.encode("hello") + [tok.token_to_id("<think>")]
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=300, reasoning_max_tokens=5,
                            structured_outputs={"json": SCHEMA})
    llm_engine.add_request("r", {"prompt_token_ids": think_open}, params)
    final = None
    while llm_engine.has_unfinished_requests():
        for out in llm_engine.step():
            final = out
    for completion in final.outputs:
        assert completion.finish_reason == "stop", completion
        reasoning, answer = completion.text.split("</think>", 1)
        assert reasoning.strip(), "the thinking block was generated freely before the answer"
        jsonschema.validate(json.loads(answer), SCHEMA)


def test_llm_chat_with_a_forced_tool_call(tiny_dense_checkpoint):
    from ernie45.engine import LLM
    from ernie45.server.tool_calls import parse

    tool = {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"term": {"type": "string", "maxLength": 6}}, "required": ["term"]}}}
    llm = LLM(str(tiny_dense_checkpoint))
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=200)
    outputs = llm.chat([[{"role": "user", "content": f"look up {i}"}] for i in range(4)], params, use_tqdm=False,
                       tools=[tool], tool_choice={"type": "function", "function": {"name": "lookup"}},
                       parallel_tool_calls=False)
    for out in outputs:
        content, calls = parse(out.outputs[0].text)
        assert out.outputs[0].finish_reason == "stop" and not content.strip() and len(calls) == 1
        assert calls[0]["function"]["name"] == "lookup"
        jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), tool["function"]["parameters"])
    with pytest.raises(ValueError, match="not in tools"):
        llm.chat([{"role": "user", "content": "x"}], params, tools=[tool],
                 tool_choice={"type": "function", "function": {"name": "nope"}})
