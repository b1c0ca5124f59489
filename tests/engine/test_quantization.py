"""Weight-only quantization: GGUF 4-bit blocks read as the file holds them, int4/int8 at load."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from parrot.service.engine.base import SamplingParams
from parrot.service.engine.builtin import cpu_kernels, quant
from parrot.service.engine.builtin.model import DecodeGroup, ForwardBatch
from tests.conftest import run_request
from tests.engine.test_attention_backend import NEW_TOKENS, PROMPTS, greedy_batch, hf_greedy

pytestmark = pytest.mark.skipif(not quant.kernels_available(),
                                reason=f"the quantized matmuls are not built: {quant.kernel_error()}")


class _Tensor:
    """What quant.read_gguf_blocks reads of a gguf.GGUFReader tensor."""

    def __init__(self, data: np.ndarray, kind: GGMLQuantizationType) -> None:
        self.data, self.tensor_type = data, kind


def _blocks(rows: int, cols: int, kind: GGMLQuantizationType, seed: int = 0):
    weights = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    data = quants.quantize(weights, kind)
    return quant.read_gguf_blocks(_Tensor(data, kind)), torch.from_numpy(quants.dequantize(data, kind))


def _close_to_float64(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """Within float32 rounding of the exact product: what reordering a float32 sum can change."""
    exact = x.double() @ w.double().T
    bound = 1e-6 * (x.double().abs() @ w.double().abs().T) + 1e-30
    assert out.dtype == torch.float32 and out.shape == exact.shape
    assert ((out.double() - exact).abs() <= bound).all()


KINDS = [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0]


@pytest.mark.parametrize("kind", KINDS)
def test_gguf_blocks_hold_exactly_the_values_gguf_de_quantizes(kind):
    parsed, expected = _blocks(48, 96, kind)
    assert parsed is not None and parsed.codes.shape == (48, 96)
    assert torch.equal(parsed.dequantize(), expected)
    # Packed for the kernel, the blocks still hold the same bits.
    assert torch.equal(parsed.to_weight().dequantize(), expected)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [1, 2, 5, 16, 17, 40])
def test_block_matmuls_multiply_float32_activations_by_those_values(kind, rows):
    parsed, expected = _blocks(72, 160, kind, seed=rows)
    x = torch.randn(rows, 160)
    _close_to_float64(parsed.to_weight()(x), x, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_a_rows_product_does_not_depend_on_its_batch(kind):
    """Each activation row is summed in one order whatever else is in the batch, so a
    request's greedy output cannot change with what it was batched with."""
    parsed, _ = _blocks(64, 320, kind)
    weight = parsed.to_weight()
    x = torch.randn(40, 320)
    alone = torch.cat([weight(row[None]) for row in x])
    for rows in (2, 3, 4, 5, 17, 40):
        assert torch.equal(weight(x[:rows]), alone[:rows])


def test_a_matmul_gives_the_same_bits_on_any_number_of_threads():
    weight = quant.quantize_int4(torch.randn(300, 256))
    x = torch.randn(3, 256)
    outputs = []
    for threads in (1, 2, 3, 8):
        cpu_kernels._threads = threads
        try:
            outputs.append(weight(x))
        finally:
            cpu_kernels._threads = None
    assert all(torch.equal(outputs[0], o) for o in outputs[1:])


def test_matmuls_from_several_threads_at_once_stay_correct():
    """Engines in one process share the kernels' thread pool: a caller that finds it busy
    computes on its own thread instead of waiting or mixing jobs."""
    weight = quant.quantize_int4(torch.randn(512, 256))
    inputs = [torch.randn(1, 256) for _ in range(8)]
    expected = [weight(x) for x in inputs]

    def run(i: int) -> bool:
        return all(torch.equal(weight(inputs[i]), expected[i]) for _ in range(200))

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(run, range(8)))


def _matmul_in_child(queue) -> None:
    # torch's own OpenMP regions hang in a child forked after the parent ran one (a libgomp
    # limit), so torch stays on one thread here; the kernels' pool still runs two.
    torch.set_num_threads(1)
    cpu_kernels._threads = 2
    weight = quant.quantize_int4(torch.randn(256, 128))
    x = torch.randn(2, 128)
    queue.put(bool(torch.allclose(weight(x), x @ weight.dequantize().T, atol=1e-4)))


def test_a_forked_process_gets_its_own_thread_pool():
    quant.quantize_int4(torch.randn(256, 128))(torch.randn(1, 128))  # the parent's workers exist
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_matmul_in_child, args=(queue,))
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0 and queue.get(timeout=1) is True


def test_the_portable_kernels_agree_with_the_vector_ones(tmp_path):
    """Machines without AVX-512 build the plain C loops: same values, other sum order."""
    try:
        portable = cpu_kernels.build(tmp_path, march="x86-64")
    except cpu_kernels.KernelBuildError as exc:
        pytest.skip(str(exc))
    assert portable.parrot_quant_simd() == 0
    for kind in KINDS:
        parsed, expected = _blocks(40, 128, kind)
        weight = parsed.to_weight()
        x = torch.randn(3, 128)
        out = torch.empty(3, 40)
        if isinstance(weight, quant.Q4Weight):
            portable.parrot_q4_matmul(x.data_ptr(), 3, 128, 128, weight.codes.data_ptr(), weight.d.data_ptr(),
                                      weight.m.data_ptr(), weight.off.data_ptr(), out.data_ptr(), 40, 40, 2)
        else:
            portable.parrot_q8_matmul(x.data_ptr(), 3, 128, 128, weight.codes.data_ptr(), weight.d.data_ptr(),
                                      out.data_ptr(), 40, 40, 2)
        _close_to_float64(out, x, expected)


def test_other_gguf_types_are_not_read_as_blocks():
    data = quants.quantize(np.ones((2, 32), dtype=np.float32), GGMLQuantizationType.Q5_0)
    assert quant.read_gguf_blocks(_Tensor(data, GGMLQuantizationType.Q5_0)) is None


def test_stacked_q4_0_and_q4_1_rows_keep_their_exact_values():
    a, a_values = _blocks(4, 64, GGMLQuantizationType.Q4_0, seed=1)
    b, b_values = _blocks(6, 64, GGMLQuantizationType.Q4_1, seed=2)
    q8, _ = _blocks(2, 64, GGMLQuantizationType.Q8_0)
    both = quant.concat([a, b])
    assert both is not None
    assert torch.equal(both.dequantize(), torch.cat([a_values, b_values]))
    assert torch.equal(both.to_weight().dequantize(), torch.cat([a_values, b_values]))
    assert quant.concat([a, q8]) is None  # 4 and 8 bits do not stack


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


def _prefill_logits(engine, ids: list[int], cached: int = 0) -> torch.Tensor:
    """The logits of ``ids[cached:]``, prefilled in one chunk after ``ids[:cached]`` (whose keys
    the KV pool holds in slots 0 .. cached - 1 from an earlier call)."""
    n = len(ids)
    new = torch.arange(cached, n)
    batch = ForwardBatch(input_ids=torch.tensor(ids[cached:]), positions=new, out_slots=new,
                         prefills=[(0, n - cached, torch.arange(n))], logit_rows=torch.arange(n - cached))
    return engine.runner.forward(batch)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4wo_multiplies_by_its_own_group_values(group):
    weights = torch.randn(96, 256)
    packed = quant.quantize_int4(weights, group)
    values = _int4_values(weights, group)
    assert (values - weights).abs().max() <= (weights.max() - weights.min()) / 30 + 1e-6
    assert torch.equal(packed.dequantize(), values)
    x = torch.randn(3, 256)
    _close_to_float64(packed(x), x, values)


def test_int8wo_multiplies_by_per_channel_values():
    weights = torch.randn(40, 64)
    packed = quant.quantize_int8(weights)
    values = _int8_values(weights)
    assert torch.equal(packed.dequantize(), values)
    x = torch.randn(2, 64)
    _close_to_float64(packed(x), x, values)


def _int4_values(weights: torch.Tensor, group: int) -> torch.Tensor:
    groups = weights.reshape(weights.shape[0], -1, group)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = (high - low) / 15
    return (torch.round((groups - low) / scale).clamp(0, 15) * scale + low).reshape(weights.shape)


def _int8_values(weights: torch.Tensor) -> torch.Tensor:
    scales = weights.abs().amax(1, keepdim=True) / 127
    return torch.round(weights / scales) * scales


def _hold_quantized_values(hf, method: str) -> None:
    """Give transformers' model the values the quantized matmuls hold (every linear, the LM
    head too)."""
    group = quant.parse_quantization(method)[1]
    with torch.no_grad():
        for module in hf.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight
                w.copy_(_int8_values(w) if method == "int8wo" else _int4_values(w, group))


@pytest.mark.parametrize("method", ["int4wo", "int4wo-64", "int8wo"])
async def test_weights_quantized_at_load_compute_with_their_quantized_values(tiny_engine_factory, method):
    engine, hf = tiny_engine_factory(quantization=method)
    exact, _ = tiny_engine_factory(quantization="none")
    ids = list(range(5, 45))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    _hold_quantized_values(hf, method)
    with torch.no_grad():
        fake = hf(torch.tensor([ids])).logits[0]
    got = _prefill_logits(engine, ids)
    assert torch.allclose(_prefill_logits(exact, ids), ref, atol=1e-4)
    assert torch.allclose(got, fake, atol=1e-4)  # float32 on the quantized values
    assert torch.equal(got.argmax(-1), fake.argmax(-1))
    few = ids[:6]  # a step of few rows runs with torch's own ops on one thread
    assert torch.allclose(_prefill_logits(engine, few), fake[:6], atol=1e-4)
    # a long chunk: many rows of the C attention, each over its own causal keys
    long = list(range(5, 105))
    with torch.no_grad():
        long_fake = hf(torch.tensor([long])).logits[0]
    assert torch.allclose(_prefill_logits(engine, long), long_fake, atol=1e-4)
    # and after a cached prefix (the prefix's keys shared by the chunk's rows)
    assert torch.allclose(_prefill_logits(engine, long, cached=30), long_fake[30:], atol=1e-4)
    assert engine.runner.weight_bytes < exact.runner.weight_bytes / (3 if method == "int8wo" else 4.5)
    # Greedy decoding (its attention in C for the lone row) follows transformers on those values.
    tokens, _, last = await run_request(engine, ids, SamplingParams(max_new_tokens=12, temperature=0))
    assert engine.runner.cpu_decode_attention
    with torch.no_grad():
        expected = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    assert tokens == expected and last.finish_reason == "length"
    await engine.shutdown()
    await exact.shutdown()


def test_a_decode_rows_logits_do_not_depend_on_its_batch(tiny_engine_factory):
    """A decode row alone (a step of few rows) and among 20 others (a bigger step, split over
    threads differently) gives the same logits, bit for bit: every kernel computes a row the
    same way whatever else the step holds."""
    engine, _ = tiny_engine_factory(quantization="int4wo")
    prompt = 300  # long enough that a row's keys are split in two ranges
    rows = 21
    for r in range(rows):  # row r's keys sit in slots r*400 .. r*400 + prompt
        slots = torch.arange(r * 400, r * 400 + prompt)
        ids = torch.randint(3, 200, (prompt,), generator=torch.Generator().manual_seed(r))
        engine.runner.forward(ForwardBatch(input_ids=ids, positions=torch.arange(prompt), out_slots=slots,
                                           prefills=[(0, prompt, slots)],
                                           logit_rows=torch.tensor([prompt - 1])))

    def decode(count: int) -> torch.Tensor:
        table = torch.stack([torch.arange(r * 400, r * 400 + prompt + 1) for r in range(count)])
        group = DecodeGroup(count, table, None, lengths=torch.full((count,), prompt + 1))
        return engine.runner.forward(ForwardBatch(
            input_ids=torch.arange(5, 5 + count), positions=torch.full((count,), prompt),
            out_slots=table[:, -1], decode_groups=[group], logit_rows=torch.arange(count)))

    alone = decode(1)
    assert torch.equal(decode(rows)[0], alone[0])
    assert torch.equal(decode(3)[0], alone[0])


async def test_batched_plain_and_two_phase_rows_decode_like_transformers(tiny_engine_factory, tokenizer,
                                                                        monkeypatch):
    """Groups of decode rows with and without a shared prefix, and short prefill chunks after
    a cached prefix, all in the C attention (and the layers' other work in C too), give
    transformers' greedy tokens."""
    decodes: list[tuple[int, bool]] = []  # (rows, shares a prefix) of each group set up
    prefills: list[tuple[int, bool]] = []  # (tokens, after a cached prefix) of each chunk

    class Recorded(cpu_kernels.DecodeAttention):
        def __init__(self, rows, *args, lengths, prefix=None, **kwargs):
            super().__init__(rows, *args, lengths=lengths, prefix=prefix, **kwargs)
            causal = rows > 1 and lengths.tolist() == list(range(1, rows + 1))
            (prefills if causal else decodes).append((rows, prefix is not None))

    monkeypatch.setattr(cpu_kernels, "DecodeAttention", Recorded)
    engine, hf = tiny_engine_factory(quantization="int4wo", two_phase_min_saved_tokens=1)
    _hold_quantized_values(hf, "int4wo")
    layers_in_c = engine.runner._layers_in_c
    steps_in_c = []  # steps of a few rows whose layers' glue ran in C too

    def counted(x, *args):
        steps_in_c.append(x.shape[0])
        return layers_in_c(x, *args)

    monkeypatch.setattr(engine.runner, "_layers_in_c", counted)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    try:
        outputs = await greedy_batch(engine, prompts)
    finally:
        await engine.shutdown()
    assert outputs == [hf_greedy(hf, ids, NEW_TOKENS) for ids in prompts]
    assert any(rows > 1 and shared for rows, shared in decodes), decodes
    assert any(rows > 1 and not shared for rows, shared in decodes), decodes
    assert any(shared for _, shared in prefills) and any(not shared for _, shared in prefills), prefills
    assert any(rows > 1 for rows in steps_in_c), steps_in_c


def test_a_folder_model_cannot_ask_for_gguf_blocks(tiny_engine_factory):
    with pytest.raises(quant.QuantizationError, match="needs a .gguf model"):
        tiny_engine_factory(quantization="gguf")


def test_a_failed_build_is_a_clear_error_and_auto_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with pytest.raises(cpu_kernels.KernelBuildError, match="building the CPU kernels failed"):
        cpu_kernels.build(tmp_path / "fresh")
    monkeypatch.setattr(quant, "kernels_available", lambda: False)
    monkeypatch.setattr(quant, "gguf_has_int4", lambda path: True)
    gguf = tmp_path / "model.gguf"
    assert quant.resolve_quantization("auto", gguf=gguf, device=torch.device("cpu")).method == "none"
    with pytest.raises(quant.QuantizationError, match="use --quantization none"):
        quant.resolve_quantization("gguf", gguf=gguf, device=torch.device("cpu"))


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs torch on two threads or more")
async def test_a_step_in_c_samples_with_torch_on_one_thread(tiny_engine_factory, monkeypatch):
    """A sampled step whose layers run in C keeps torch on one thread until its sampling is done
    (torch's second thread would spin into the next step's kernels), the kernels on all of them,
    and gives torch its threads back after the step."""
    import parrot.service.engine.builtin.engine as engine_module

    engine, _ = tiny_engine_factory(quantization="int4wo")
    assert engine.runner.step_threads(200) is not None and engine.runner._layer_refs is not None
    threads = torch.get_num_threads()
    seen: list[tuple[int, int]] = []
    real_sample = engine_module.sample

    def sample(*args):
        seen.append((torch.get_num_threads(), cpu_kernels.threads()))
        return real_sample(*args)

    monkeypatch.setattr(engine_module, "sample", sample)
    prompt = list(range(5, 105))  # a 100-token prefill step, then decode steps
    sampled = SamplingParams(max_new_tokens=4, temperature=1.0, seed=3)
    tokens, _, last = await run_request(engine, prompt, sampled)
    assert len(tokens) == 4 and last.finish_reason == "length"
    assert seen == [(1, threads)] * 4
    assert torch.get_num_threads() == threads
    await engine.shutdown()
