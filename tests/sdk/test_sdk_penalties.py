"""Penalties, logit bias and min_tokens from the native SDK (``P.SamplingConfig``) through a live
service on a tiny random-weight llama."""

# No ``from __future__ import annotations``: the outputs' annotations below use a local value
# (the token id), so they must be evaluated where they are written.
import pytest
from pydantic import ValidationError

import parrot as P


def test_sampling_config_carries_penalties_and_checks_them():
    config = P.SamplingConfig(max_tokens=8, presence_penalty=1.0, frequency_penalty=-0.5,
                              repetition_penalty=1.2, logit_bias={"7": 5}, min_tokens=2)
    assert config.logit_bias == {7: 5.0}
    assert P.SamplingConfig.model_validate_json(config.model_dump_json()) == config
    for bad in ({"presence_penalty": 3}, {"logit_bias": {7: 101}}, {"min_tokens": 9, "max_tokens": 8},
                {"repetition_penalty": 0}):
        with pytest.raises(ValidationError):
            P.SamplingConfig(**bad)


def test_a_semantic_function_with_bias_and_penalties(service_url, tokenizer):
    forced = tokenizer.encode(" banana")[0]
    word = tokenizer.decode([forced])

    @P.semantic_function()
    def forced_fn(topic: P.Input, out: P.Output(max_tokens=4, ignore_eos=True, logit_bias={forced: 100})):
        """Write about {{input:topic}}: {{output:out}}"""

    @P.semantic_function()
    def looping(topic: P.Input, out: P.Output(max_tokens=16, ignore_eos=True, logit_bias={forced: 20})):
        """Write about {{input:topic}}: {{output:out}}"""

    @P.semantic_function()
    def penalized(topic: P.Input, out: P.Output(max_tokens=16, ignore_eos=True, logit_bias={forced: 20},
                                                frequency_penalty=2.0, presence_penalty=2.0)):
        """Write about {{input:topic}}: {{output:out}}"""

    with P.Parrot(service_url) as vm:
        topic = vm.variable("fruit")
        assert forced_fn(topic).get() == word * 4
        loop_ids = tokenizer.encode(looping(topic).get())
        pen_ids = tokenizer.encode(penalized(topic).get())
    assert loop_ids.count(forced) >= 12
    assert 1 <= pen_ids.count(forced) <= 8
