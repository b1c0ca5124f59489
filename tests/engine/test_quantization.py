"""Weight-only quantization: GGUF 4-bit blocks read as the file holds them, int4/int8 at load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from parrot.service.engine.base import SamplingParams
from parrot.service.engine.builtin import quant
from parrot.service.engine.builtin.model import ForwardBatch
from tests.conftest import run_request

pytestmark = pytest.mark.skipif(not quant.int4_kernels_available(),
                                reason="this torch build lacks the packed int4/int8 CPU kernels")


class _Tensor:
    """What quant.read_gguf_int4 reads of a gguf.GGUFReader tensor."""

    def __init__(self, data: np.ndarray, kind: GGMLQuantizationType) -> None:
        self.data, self.tensor_type = data, kind


@pytest.mark.parametrize("kind", [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1])
def test_gguf_blocks_dequantize_exactly_as_gguf_does(kind):
    weights = np.random.default_rng(0).standard_normal((48, 96)).astype(np.float32)
    blocks = quants.quantize(weights, kind)
    parsed = quant.read_gguf_int4(_Tensor(blocks, kind))
    assert parsed is not None and parsed.codes.shape == (48, 96)
    expected = torch.from_numpy(quants.dequantize(blocks, kind))
    assert torch.equal(parsed.dequantize(), expected)
    # The packed kernel computes with those values (bfloat16 scales and activations).
    x = torch.randn(5, 96)
    out = parsed.to_weight()(x)
    ref = x @ expected.T
    assert out.dtype == torch.float32 and out.shape == (5, 48)
    assert (out - ref).abs().max() <= 0.02 * ref.abs().max()


def test_other_gguf_types_are_not_read_as_int4():
    blocks = quants.quantize(np.ones((2, 32), dtype=np.float32), GGMLQuantizationType.Q8_0)
    assert quant.read_gguf_int4(_Tensor(blocks, GGMLQuantizationType.Q8_0)) is None


def test_stacked_q4_0_and_q4_1_rows_keep_their_values():
    rng = np.random.default_rng(1)
    a = quant.read_gguf_int4(_Tensor(quants.quantize(rng.standard_normal((4, 64)).astype(np.float32),
                                                     GGMLQuantizationType.Q4_0), GGMLQuantizationType.Q4_0))
    b = quant.read_gguf_int4(_Tensor(quants.quantize(rng.standard_normal((6, 64)).astype(np.float32),
                                                     GGMLQuantizationType.Q4_1), GGMLQuantizationType.Q4_1))
    assert a is not None and b is not None
    both = quant.concat([a, b])
    assert torch.allclose(both.dequantize(), torch.cat([a.dequantize(), b.dequantize()]), atol=1e-6)


@pytest.mark.parametrize(("rows", "heads"), [(64, 4), (32, 2), (48, 3)])
def test_row_order_undoes_the_llama_cpp_permutation_like_transformers(rows, heads):
    weights = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
    expected = LlamaTensorProcessor()._reverse_permute_weights(weights, heads)
    order = quant.llama_rope_row_order(rows, heads)
    assert np.array_equal(weights[order.numpy()], expected)


@pytest.mark.parametrize(("name", "parsed"), [
    ("none", ("none", 32)), ("gguf", ("gguf", 32)), ("int4wo", ("int4wo", 32)),
    ("int4wo-128", ("int4wo", 128)), ("int8wo", ("int8wo", 32)), ("auto", ("auto", 32)),
])
def test_quantization_names(name, parsed):
    assert quant.parse_quantization(name) == parsed


@pytest.mark.parametrize(("name", "message"), [
    ("int3", "unknown quantization 'int3'"),
    ("int4wo-48", "int4wo group size must be one of"),
    ("awq", "unknown quantization 'awq'"),
])
def test_bad_quantization_names_are_refused(name, message):
    with pytest.raises(quant.QuantizationError, match=message):
        quant.parse_quantization(name)


def test_what_auto_and_explicit_choices_resolve_to():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert quant.resolve_quantization("auto", gguf=None, device=cpu).method == "none"
    assert quant.resolve_quantization("int4wo-64", gguf=None, device=cpu) == quant.QuantConfig("int4wo", 64)
    with pytest.raises(quant.QuantizationError, match="needs a .gguf model"):
        quant.resolve_quantization("gguf", gguf=None, device=cpu)
    with pytest.raises(quant.QuantizationError, match="CPU only"):
        quant.resolve_quantization("int8wo", gguf=None, device=cuda)


def _prefill_logits(engine, ids: list[int]) -> torch.Tensor:
    n = len(ids)
    batch = ForwardBatch(input_ids=torch.tensor(ids), positions=torch.arange(n), out_slots=torch.arange(n),
                         prefills=[(0, n, torch.arange(n))], logit_rows=torch.arange(n))
    return engine.runner.forward(batch)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4wo_multiplies_by_its_own_group_values(group):
    weights = torch.randn(96, 256)
    packed = quant.quantize_int4(weights, group)
    values = _int4_values(weights, group)
    assert (values - weights).abs().max() <= (weights.max() - weights.min()) / 30 + 1e-6
    x = torch.randn(3, 256)
    ref = x @ values.T
    assert (packed(x) - ref).abs().max() <= 0.02 * ref.abs().max()


def test_int8wo_multiplies_by_per_channel_values():
    weights = torch.randn(40, 64)
    packed = quant.Int8Weight(weights)
    values = _int8_values(weights)
    x = torch.randn(2, 64)
    ref = x @ values.T
    assert (packed(x) - ref).abs().max() <= 0.02 * ref.abs().max()


def _int4_values(weights: torch.Tensor, group: int) -> torch.Tensor:
    groups = weights.reshape(weights.shape[0], -1, group)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = (high - low) / 15
    return (torch.round((groups - low) / scale).clamp(0, 15) * scale + low).reshape(weights.shape)


def _int8_values(weights: torch.Tensor) -> torch.Tensor:
    scales = weights.abs().amax(1, keepdim=True) / 127
    return torch.round(weights / scales) * scales


@pytest.mark.parametrize("method", ["int4wo", "int4wo-64", "int8wo"])
async def test_weights_quantized_at_load_compute_with_their_quantized_values(tiny_engine_factory, method):
    engine, hf = tiny_engine_factory(quantization=method)
    exact, _ = tiny_engine_factory(quantization="none")
    ids = list(range(5, 45))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
        # transformers on the values the quantized matmuls hold (every linear, the LM head too)
        group = quant.parse_quantization(method)[1]
        for module in hf.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight
                w.copy_(_int8_values(w) if method == "int8wo" else _int4_values(w, group))
        fake = hf(torch.tensor([ids])).logits[0]
    got = _prefill_logits(engine, ids)
    assert torch.allclose(_prefill_logits(exact, ids), ref, atol=1e-4)
    error = (got - fake).abs()  # bfloat16 activations and scales
    assert error.mean() <= 0.01 * fake.abs().max() and error.max() <= 0.1 * fake.abs().max()
    assert (got.argmax(-1) == fake.argmax(-1)).float().mean() >= 0.9
    assert engine.runner.weight_bytes < exact.runner.weight_bytes / (3 if method == "int8wo" else 5)
    tokens, _, last = await run_request(engine, ids, SamplingParams(max_new_tokens=8, temperature=0))
    assert len(tokens) == 8 and last.finish_reason == "length"
    await engine.shutdown()
    await exact.shutdown()


def test_a_folder_model_cannot_ask_for_gguf_blocks(tiny_engine_factory):
    with pytest.raises(quant.QuantizationError, match="needs a .gguf model"):
        tiny_engine_factory(quantization="gguf")
