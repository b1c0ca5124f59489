"""Quantized weights side by side: bytes, batch-1 decode speed, and agreement with transformers.

For each ``--quantization`` choice of the builtin engine (default: none, gguf, int4wo,
int8wo) on the default model, in one run:
  - the bytes of matmul weights one decode step reads,
  - batch-1 greedy decode time per token (in-process, best of ``--repeats``),
  - token agreement with ``transformers``' own greedy ``generate`` on the de-quantized
    weights (the exact reference every choice is compared with) over a fixed prompt set:
    how many prompts match for all ``--new-tokens`` tokens, and the mean length of the
    common prefix.

    python benchmarks/quantization.py [--methods none,gguf] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import torch

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Three tips for staying healthy are",
    "Once upon a time, in a small village,",
    "The best way to learn a new language is",
    "Water boils at",
    "import numpy as np\n",
    "The three primary colors are",
]
CHATS = [
    "Name a fruit.",
    "Write a haiku about the sea.",
    "What is the capital of Japan?",
    "List the planets of the solar system.",
    "Explain photosynthesis in one sentence.",
    "Give me three tips for a job interview.",
    "Translate 'good morning' into French.",
    "Why is the sky blue?",
]


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


async def _generate(engine, ids: list[int], n: int) -> tuple[list[int], float]:
    from parrot.service.engine.base import GenerateRequest, SamplingParams

    tokens: list[int] = []
    first = end = 0.0
    request = GenerateRequest(engine.new_request_id(), ids, SamplingParams(max_new_tokens=n, temperature=0))
    async for out in engine.generate(request):
        if out.token_ids and not first:
            first = time.perf_counter()
        tokens += out.token_ids
        end = time.perf_counter()
    per_token = (end - first) / max(len(tokens) - 1, 1)
    return tokens, per_token


async def _measure(method: str, prompts: list[list[int]], args) -> tuple[int, float, list[list[int]]]:
    from parrot.service.engine.base import GenerateRequest, SamplingParams
    from parrot.service.engine.builtin.engine import BuiltinEngine, BuiltinEngineConfig

    engine = BuiltinEngine(BuiltinEngineConfig(kv_cache_gib=0.5, quantization=method))
    try:
        outputs = [(await _generate(engine, ids, args.new_tokens))[0] for ids in prompts]
        # Decode speed: one long greedy generation at batch 1, best of the repeats.
        speed = []
        sampling = SamplingParams(max_new_tokens=args.speed_tokens, temperature=0, ignore_eos=True)
        for i in range(args.repeats):
            first = end = 0.0
            count = 0
            async for out in engine.generate(GenerateRequest(f"speed-{i}", prompts[-1], sampling)):
                if out.token_ids and not first:
                    first = time.perf_counter()
                count += len(out.token_ids)
                end = time.perf_counter()
            speed.append((end - first) / max(count - 1, 1))
        return engine.runner.weight_bytes, min(speed), outputs
    finally:
        await engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="none,gguf,int4wo,int8wo")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--speed-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from parrot.service.engine.builtin import loader
    from parrot.service.engine.tokenizer import ModelTokenizer

    name, path = loader.resolve_model(None)
    tokenizer = ModelTokenizer(loader.load_tokenizer(path), name)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    prompts += [tokenizer.apply_chat_template([{"role": "user", "content": c}]) for c in CHATS]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    reference = [
        hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                    max_new_tokens=args.new_tokens, do_sample=False)[0, len(ids):].tolist()
        for ids in prompts
    ]
    del hf

    rows = []
    for method in args.methods.split(","):
        weight_bytes, per_token, outputs = asyncio.run(_measure(method, prompts, args))
        prefixes = [common_prefix(o, r) for o, r in zip(outputs, reference, strict=True)]
        full = sum(p == len(r) for p, r in zip(prefixes, reference, strict=True))
        rows.append((method, weight_bytes, per_token, full, statistics.mean(prefixes)))

    base = next((r for r in rows if r[0] == "none"), rows[0])
    print(f"\n{len(prompts)} prompts x {args.new_tokens} greedy tokens against transformers "
          f"(float32, de-quantized weights); batch-1 decode best of {args.repeats} x "
          f"{args.speed_tokens} tokens\n")
    print(f"{'quantization':<14}{'weights MB':>11}{'ms/token':>10}{'speed-up':>10}"
          f"{'all tokens equal':>18}{'mean common prefix':>20}")
    for method, weight_bytes, per_token, full, prefix in rows:
        print(f"{method:<14}{weight_bytes / 1e6:>11.0f}{per_token * 1e3:>10.1f}{base[2] / per_token:>9.2f}x"
              f"{f'{full}/{len(prompts)}':>18}{prefix:>20.1f}")


if __name__ == "__main__":
    main()
