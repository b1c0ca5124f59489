"""JSON-schema constrained output in the builtin engine, on a tiny random-weight model.

A random model follows no instruction, so whatever it writes under a constraint is the
constraint's doing. The schemas bound every string, number and array, so each output
completes within a known number of tokens and can be checked whole.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from parrot.service.engine.base import GenerateRequest, InvalidRequestError, SamplingParams
from parrot.service.engine.builtin.engine import BuiltinEngine, BuiltinEngineConfig
from parrot.service.engine.builtin.sampler import apply_token_bitmask
from tests.conftest import run_request as run

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", "parrot"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 6}, "zip": {"type": "integer",
                                                                                "minimum": 0,
                                                                                "maximum": 99999}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "verified": {"type": "boolean"},
    },
    "required": ["name", "age", "pet", "tags", "address", "verified"],
    "additionalProperties": False,
}

PROMPTS = [
    "The quick brown fox jumps over the lazy dog because",
    "In a distant galaxy",
    "def add(a, b):\n    return",
    "Once upon a time there lived a king who had three daughters and a",
]


def check(value, schema: dict) -> None:
    """Assert ``value`` follows ``schema`` (the keywords the schemas here use)."""
    if "enum" in schema:
        assert value in schema["enum"], value
        return
    kind = schema["type"]
    if kind == "object":
        assert isinstance(value, dict), value
        props = schema.get("properties", {})
        assert set(schema.get("required", [])) <= value.keys(), value
        if schema.get("additionalProperties") is False:
            assert value.keys() <= props.keys(), value
        for key, sub in props.items():
            if key in value:
                check(value[key], sub)
    elif kind == "array":
        assert isinstance(value, list) and len(value) <= schema.get("maxItems", len(value)), value
        for item in value:
            check(item, schema["items"])
    elif kind == "string":
        assert isinstance(value, str) and len(value) <= schema.get("maxLength", len(value)), value
    elif kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), value
        assert schema.get("minimum", value) <= value <= schema.get("maximum", value), value
    elif kind == "boolean":
        assert isinstance(value, bool), value
    else:
        raise AssertionError(f"the checker does not know {kind!r}")


def constrained(schema=PERSON, n: int = 200, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=kw.pop("temperature", 0.0), json_schema=schema, **kw)


async def test_outputs_validate_against_the_schema(tiny_engine_factory, tokenizer):
    engine, _ = tiny_engine_factory()
    try:
        for prompt in PROMPTS:
            ids = tokenizer.encode(prompt)
            for sampling in (constrained(), constrained(temperature=1.0, seed=7),
                             constrained(temperature=1.3, top_p=0.9, seed=3)):
                tokens, text, last = await run(engine, ids, sampling)
                assert last.finish_reason == "stop", text
                check(json.loads(text), PERSON)
                assert tokenizer.decode(tokens) == text  # ends at the closing brace, no EOS needed
        # One compiled grammar served every request.
        assert engine.grammars.num_compiled == 1
    finally:
        await engine.shutdown()


async def test_mixed_batch_leaves_unconstrained_output_unchanged(tiny_engine_factory, tokenizer):
    engine, _ = tiny_engine_factory()
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    plain = SamplingParams(max_new_tokens=24, temperature=0.0)
    sampled = SamplingParams(max_new_tokens=24, temperature=1.0, seed=11)
    try:
        alone = [await run(engine, ids, sp) for ids in prompts for sp in (plain, sampled)]
        json_alone = [await run(engine, ids, constrained()) for ids in prompts]
        engine.cache.reset()
        # Everything at once: constrained and unconstrained requests share batches.
        mixed = await asyncio.gather(
            *(run(engine, ids, sp) for ids in prompts for sp in (plain, sampled)),
            *(run(engine, ids, constrained()) for ids in prompts),
        )
        assert [m[0] for m in mixed[:len(alone)]] == [a[0] for a in alone]
        assert [m[1] for m in mixed[len(alone):]] == [a[1] for a in json_alone]
        for _, text, _ in mixed[len(alone):]:
            check(json.loads(text), PERSON)
        engine.cache.check_integrity()
    finally:
        await engine.shutdown()


async def test_json_object_mode_gives_an_object(tiny_engine_factory):
    # Any object may have any keys, so a random model can write one key for ever; on these
    # chat prompts it closes the object, and every request must end as a JSON object.
    engine, _ = tiny_engine_factory()
    chats = [[{"role": "user", "content": c}] for c in ("Say hi", "Name three colors as JSON.")]
    try:
        for messages in chats:
            for sampling in (constrained({"type": "object"}, n=64),
                             constrained({"type": "object"}, n=64, temperature=1.0, seed=1)):
                _, text, last = await run(engine, engine.tokenizer.apply_chat_template(messages), sampling)
                assert last.finish_reason == "stop", text
                assert isinstance(json.loads(text), dict)
    finally:
        await engine.shutdown()


async def test_scalar_schema_ends_at_eos_or_when_nothing_can_follow(tiny_engine_factory, tokenizer):
    engine, _ = tiny_engine_factory()
    schema = {"type": "integer", "minimum": 0, "maximum": 99}
    try:
        for prompt in PROMPTS:
            tokens, text, last = await run(engine, tokenizer.encode(prompt), constrained(schema, n=16))
            assert last.finish_reason == "stop"
            assert 0 <= json.loads(text) <= 99 and len(tokens) <= 3  # two digits, maybe EOS
    finally:
        await engine.shutdown()


async def test_prefix_cache_hit_gives_the_same_constrained_output(tiny_engine_factory, tokenizer):
    engine, _ = tiny_engine_factory()
    ids = tokenizer.encode(PROMPTS[0])
    try:
        first = await run(engine, ids, constrained())
        second = await run(engine, ids, constrained())
        assert second[2].num_cached_tokens == len(ids) - 1
        assert second[0] == first[0]
        # A follow-up whose prompt extends the first prompt and its answer hits the cache too.
        follow = ids + first[0] + tokenizer.encode(" and again:")
        _, text, last = await run(engine, follow, constrained())
        assert last.num_cached_tokens >= len(ids) + len(first[0]) - 1
        check(json.loads(text), PERSON)
    finally:
        await engine.shutdown()


async def test_max_tokens_and_stop_strings_cut_constrained_output(tiny_engine_factory, tokenizer):
    engine, _ = tiny_engine_factory()
    ids = tokenizer.encode(PROMPTS[1])
    try:
        full_tokens, full, _ = await run(engine, ids, constrained())
        tokens, text, last = await run(engine, ids, constrained(n=5))
        assert last.finish_reason == "length" and tokens == full_tokens[:5] and full.startswith(text)
        _, text, last = await run(engine, ids, constrained(stop=('"pet"',)))
        assert last.finish_reason == "stop" and text == full[:full.index('"pet"')]
    finally:
        await engine.shutdown()


async def test_resumed_generation_continues_the_json(tiny_engine_factory, tokenizer):
    engine, _ = tiny_engine_factory()
    ids = tokenizer.encode(PROMPTS[2])
    try:
        tokens, text, _ = await run(engine, ids, constrained())
        k = len(tokens) // 2
        rest, _, last = await run(engine, ids + tokens[:k], constrained(resumed_output_len=k))
        assert last.finish_reason == "stop" and tokens[:k] + rest == tokens
        # Earlier output that the schema could never have produced is refused up front.
        bad = tokenizer.encode("hello")
        with pytest.raises(InvalidRequestError, match="does not match the JSON schema"):
            await run(engine, ids + bad, constrained(resumed_output_len=len(bad)))
        with pytest.raises(InvalidRequestError, match="resumed_output_len"):
            await run(engine, ids, constrained(resumed_output_len=len(ids) + 1))
    finally:
        await engine.shutdown()


async def test_ignore_eos_still_ends_when_the_json_is_complete(tiny_engine_factory, tokenizer):
    engine, _ = tiny_engine_factory()
    try:
        _, text, last = await run(engine, tokenizer.encode(PROMPTS[3]), constrained(ignore_eos=True))
        assert last.finish_reason == "stop"
        check(json.loads(text), PERSON)
    finally:
        await engine.shutdown()


@pytest.mark.parametrize("schema,says", [
    ({"type": "wizard"}, "wizard"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),
    ({"type": "string", "pattern": "(("}, "regex"),
    ({"not": {"type": "string"}}, "not"),
    ({"type": "object", "properties": {"a": {"type": "string", "minLength": 5, "maxLength": 2}},
      "required": ["a"]}, "unsatisfiable"),
])
async def test_bad_schema_is_rejected_before_anything_runs(tiny_engine_factory, tokenizer, schema, says):
    engine, _ = tiny_engine_factory()
    ids = tokenizer.encode(PROMPTS[0])
    try:
        with pytest.raises(InvalidRequestError, match=f"(?i)JSON schema is invalid.*{says}"):
            await run(engine, ids, constrained(schema))
        with pytest.raises(InvalidRequestError):
            await engine.check(GenerateRequest("checked", ids, constrained(schema)))
        # The engine goes on serving, constrained or not.
        _, text, last = await run(engine, ids, constrained())
        check(json.loads(text), PERSON)
        assert (await run(engine, ids, SamplingParams(max_new_tokens=4, temperature=0)))[2].finished
        assert engine.load().num_running == 0
    finally:
        await engine.shutdown()


async def test_grammars_compile_once_per_distinct_schema(tiny_engine_factory, tokenizer):
    engine, _ = tiny_engine_factory()
    reordered = dict(reversed(list(PERSON.items())))
    ids = tokenizer.encode(PROMPTS[0])
    try:
        await asyncio.gather(*(run(engine, ids, constrained(s)) for s in (PERSON, reordered, PERSON)))
        assert engine.grammars.num_compiled == 1
        await run(engine, ids, constrained({"type": "object"}, n=64))
        assert engine.grammars.num_compiled == 2
    finally:
        await engine.shutdown()


def test_token_bitmask_masks_only_its_rows():
    logits = torch.randn(3, 70)
    bitmask = torch.zeros(2, 3, dtype=torch.int32)
    bitmask[0, 0] = 0b101  # row 0 keeps tokens 0 and 2
    bitmask[1, 2] = 1 << 5  # row 2 keeps token 69
    out = apply_token_bitmask(logits, [0, 2], bitmask)
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [0, 2]
    assert torch.isfinite(out[2]).nonzero().flatten().tolist() == [69]
    assert torch.equal(out[1], logits[1]) and torch.equal(out[0, [0, 2]], logits[0, [0, 2]])
    with torch.inference_mode():  # the model's logits are inference tensors
        frozen = torch.randn(1, 40)
    assert torch.isfinite(apply_token_bitmask(frozen, [0], torch.ones(1, 2, dtype=torch.int32))).sum() == 2


@pytest.mark.e2e
async def test_default_model_answers_in_schema():
    engine = BuiltinEngine(BuiltinEngineConfig(device="cpu", kv_cache_gib=0.25))
    colors = {"type": "array", "items": {"type": "string"}, "maxItems": 4}  # greedy loops otherwise
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "colors": colors},
              "required": ["name", "age", "colors"], "additionalProperties": False}
    chat = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tom is a 3 year old cat, black and white. Reply in JSON."}])
    try:
        plain = await run(engine, chat, SamplingParams(max_new_tokens=8, temperature=0))
        _, text, last = await run(engine, chat, constrained(schema, n=64))
        _, obj, _ = await run(engine, chat, constrained({"type": "object"}, n=96))
    finally:
        await engine.shutdown()
    assert not plain[1].startswith("{")  # left alone, this model wraps its JSON in a code block
    assert last.finish_reason == "stop"
    answer = json.loads(text)
    assert answer["name"] == "Tom" and answer["age"] == 3
    assert 1 <= len(answer["colors"]) <= 4 and all(isinstance(c, str) for c in answer["colors"])
    answer = json.loads(obj)
    assert isinstance(answer, dict) and answer["name"] == "Tom"


def test_a_token_the_matcher_refuses_fails_the_request_loudly(tiny_engine_factory, tokenizer):
    # Sampling under the mask never picks such a token; if one came anyway, the request must
    # end with an error rather than hand back output that breaks the schema.
    engine, _ = tiny_engine_factory()
    ids = tokenizer.encode(PROMPTS[0])
    request = GenerateRequest("refused", ids, constrained())
    engine._add(request, engine.grammars.matcher(PERSON, []))
    req = engine._requests["refused"]
    engine._append_token(req, tokenizer.encode("hello")[0])
    assert req.finish_reason == "abort" and "refused" not in engine._requests
