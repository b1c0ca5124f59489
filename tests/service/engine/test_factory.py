"""Engine specs and config files: parsing, and clear one-line errors for every mistake."""

from __future__ import annotations

import pytest

from parrot.service.engine.factory import (
    EngineSpec,
    EngineSpecError,
    build_engine,
    find_tokenizer,
    load_config,
    parse_engine_spec,
    probe,
)


def test_a_spec_names_a_kind_and_a_url():
    spec = parse_engine_spec("sglang=http://10.0.0.5:30000/")
    assert (spec.kind, spec.url) == ("sglang", "http://10.0.0.5:30000")
    assert parse_engine_spec("openai=https://api.example.com/v1").kind == "openai"


@pytest.mark.parametrize(("text", "message"), [
    ("sglang", "expected KIND=URL"),
    ("sglang=", "expected KIND=URL"),
    ("vllm=http://h:1/v1", "unknown engine kind 'vllm'; use sglang or openai"),
    ("openai=ftp://h/v1", "is not an http(s) URL"),
    ("openai=localhost:8000", "is not an http(s) URL"),
])
def test_bad_specs_say_what_is_wrong(text, message):
    with pytest.raises(EngineSpecError, match="--engine") as info:
        parse_engine_spec(text)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_config_file_lists_engines_with_their_options(tmp_path, monkeypatch):
    path = tmp_path / "parrot.toml"
    path.write_text('local_engine = false\n\n'
                    '[[engines]]\nkind = "sglang"\nurl = "http://gpu-1:30000"\ntokenizer = "/models/x"\n\n'
                    '[[engines]]\nkind = "openai"\nurl = "http://vllm:8000/v1"\nmodel = "m"\n'
                    'api_key_env = "UPSTREAM_KEY"\nmax_concurrency = 4\n')
    config = load_config(path)
    assert config.local_engine is False
    sglang, openai = config.engines
    assert (sglang.kind, sglang.tokenizer) == ("sglang", "/models/x")
    assert (openai.model, openai.max_concurrency) == ("m", 4)
    with pytest.raises(EngineSpecError, match="UPSTREAM_KEY"):
        openai.resolved_api_key()
    monkeypatch.setenv("UPSTREAM_KEY", "sk-1")
    assert openai.resolved_api_key() == "sk-1"


@pytest.mark.parametrize(("content", "message"), [
    ("[[engines]]\nkind = 'sglang'\n", "engines.0.url: Field required"),
    ("[[engines]]\nkind = 'sglang'\nurl = 'http://h:1'\nspeed = 3\n", "engines.0.speed"),
    ("engines = [\n", "is not valid TOML"),
    ("[[engines]]\nkind = 'openai'\nurl = 'http://h/v1'\nmax_concurrency = 0\n", "greater than 0"),
])
def test_bad_config_files_say_where(tmp_path, content, message):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(EngineSpecError) as info:
        load_config(path)
    assert message in str(info.value) and str(path) in str(info.value)
    with pytest.raises(EngineSpecError, match="cannot read the config file"):
        load_config(tmp_path / "missing.toml")


def test_an_unreachable_server_is_a_clear_error():
    spec = EngineSpec(kind="openai", url="http://127.0.0.1:9/v1")
    with pytest.raises(EngineSpecError, match=r"the openai engine at http://127.0.0.1:9/v1 is unreachable"):
        build_engine(spec)


def test_a_server_of_the_wrong_kind_is_named(live_server):
    # A Parrot service answers /v1/models but is no SGLang server (no /server_info).
    with pytest.raises(EngineSpecError, match="did not answer as an sglang server does"):
        probe(EngineSpec(kind="sglang", url=live_server.base_url))
    assert probe(EngineSpec(kind="openai", url=f"{live_server.base_url}/v1")) == ("tiny-llama", None)
    with pytest.raises(EngineSpecError, match="does not serve 'other'; it serves 'tiny-llama'"):
        probe(EngineSpec(kind="openai", url=f"{live_server.base_url}/v1", model="other"))


def test_the_tokenizer_comes_from_the_spec_or_an_engine_of_the_same_model(live_server, tmp_path):
    spec = EngineSpec(kind="openai", url=f"{live_server.base_url}/v1")
    assert find_tokenizer(spec, "tiny-llama", None, [live_server.engine]) is live_server.engine.tokenizer
    with pytest.raises(EngineSpecError, match="whose tokenizer is not on this host"):
        find_tokenizer(spec, "tiny-llama", None, [])
    live_server.engine.tokenizer.hf.save_pretrained(tmp_path / "tok")
    named = find_tokenizer(spec.model_copy(update={"tokenizer": str(tmp_path / "tok")}), "tiny-llama", None)
    assert named.encode("hello there") == live_server.engine.tokenizer.encode("hello there")
    with pytest.raises(EngineSpecError, match="tokenizer '/nowhere'"):
        find_tokenizer(spec.model_copy(update={"tokenizer": "/nowhere"}), "tiny-llama", None)
