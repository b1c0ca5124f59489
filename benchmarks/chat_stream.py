"""One streamed chat, as a person chatting feels it: Parrot's service against llama.cpp's server.

Both serve the default model from the same shipped GGUF file over HTTP, each with its
default settings, and both get the same messages on ``/v1/chat/completions`` with
``stream: true``, greedy (or sampled, ``--temperature``), one request at a time. The script
starts both servers itself, warms each up, then streams ``--repeats`` chats from each and
prints time to first token and decode tokens/s (tokens after the first, over the time from
the first to the last chunk), best of the repeats, and the ratio Parrot / llama.cpp.

    python benchmarks/chat_stream.py [--new-tokens 128] [--repeats 3] [--parrot-args "--quantization none"]
    python benchmarks/chat_stream.py --temperature 1.0        # sampled, as OpenAI's default
    python benchmarks/chat_stream.py --document-sentences 40  # the chat quotes a ~860-token report first

llama.cpp's server is llama-cpp-python's (``pip install -e '.[bench]'``); without it the
llama.cpp row is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

QUESTION = "Write a long story about a parrot who learns to fly."


def messages(document_sentences: int, chat: int) -> list[dict]:
    """Chat number ``chat``: the question, after a report of ``document_sentences`` sentences
    (~13 tokens each) that starts with the chat's number, so no chat finds another's report cached."""
    report = " ".join(f"In week {i}, the parrot sanctuary counted {7 * i + 3} visitors and {i % 5 + 1} new "
                      f"birds." for i in range(document_sentences))
    content = f"Report {chat}: {report}\n\n{QUESTION}" if document_sentences else QUESTION
    return [{"role": "user", "content": content}]


@dataclass
class Stream:
    ttft_s: float
    tokens: int
    decode_s: float

    @property
    def tokens_per_s(self) -> float:
        return (self.tokens - 1) / self.decode_s if self.decode_s > 0 else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(command: list[str], url: str, ready_path: str, timeout_s: float = 300):
    """Run ``command`` until the block ends; wait until ``url + ready_path`` answers 200."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                tail = proc.stderr.read()[-2000:] if proc.stderr else ""
                raise RuntimeError(f"{command[:3]} exited: {tail}")
            try:
                if httpx.get(url + ready_path, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{command[:3]} did not come up in {timeout_s:.0f} s")
            time.sleep(0.5)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def stream_chat(base_url: str, model: str, new_tokens: int, args, chat: int) -> Stream:
    body = {"model": model, "messages": messages(args.document_sentences, chat), "max_tokens": new_tokens,
            "temperature": args.temperature, "seed": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = 0.0
    chunks = 0
    usage_tokens = None
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage_tokens = chunk["usage"].get("completion_tokens")
            choices = chunk.get("choices") or []
            if choices and (choices[0].get("delta") or {}).get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
                chunks += 1
    tokens = usage_tokens or chunks  # a chunk may carry several tokens; usage counts them all
    return Stream(first - start, tokens, last - first)


def measure(name: str, base_url: str, model: str, args) -> list[Stream]:
    stream_chat(base_url, model, 8, args, 0)  # warm-up
    runs = [stream_chat(base_url, model, args.new_tokens, args, i + 1) for i in range(args.repeats)]
    for i, run in enumerate(runs):
        print(f"  {name} run {i + 1}: {run.tokens} tokens, TTFT {run.ttft_s * 1e3:.0f} ms, "
              f"{run.tokens_per_s:.1f} tokens/s", flush=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                        help="llama.cpp's threads (Parrot uses torch's default: all cores)")
    parser.add_argument("--parrot-args", default="", help="extra options for parrot serve")
    parser.add_argument("--systems", default="parrot,llamacpp")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else both sample (seed 0)")
    parser.add_argument("--document-sentences", type=int, default=0,
                        help="the chat quotes a report of this many sentences (~13 tokens each) first")
    args = parser.parse_args()

    from parrot.service.engine.builtin import loader

    results: dict[str, list[Stream]] = {}
    systems = args.systems.split(",")
    if "parrot" in systems:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "parrot.service", "serve", "--port", str(port),
                   "--log-level", "warning", *shlex.split(args.parrot_args)]
        with server(command, url, "/readyz"):
            results["parrot"] = measure("parrot", url, loader.DEFAULT_MODEL, args)
    if "llamacpp" in systems:
        try:
            import llama_cpp.server  # noqa: F401
        except ImportError:
            print("llama.cpp row skipped: llama-cpp-python[server] is not installed "
                  "(pip install -e '.[bench]')")
        else:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            command = [sys.executable, "-m", "llama_cpp.server", "--model", str(loader.default_gguf_path()),
                       "--port", str(port), "--n_threads", str(args.threads), "--n_ctx", "2048",
                       "--verbose", "false"]
            with server(command, url, "/v1/models"):
                results["llamacpp"] = measure("llamacpp", url, "default", args)

    how = f"temperature {args.temperature:g}" if args.temperature else "greedy"
    prompt = f", after a {args.document_sentences}-sentence report" if args.document_sentences else ""
    print(f"\nOne chat streamed through /v1/chat/completions{prompt}, {how}, up to {args.new_tokens} tokens, "
          f"best of {args.repeats}:")
    best = {name: max(runs, key=lambda r: r.tokens_per_s) for name, runs in results.items()}
    for name, run in best.items():
        print(f"  {name:<9} TTFT {min(r.ttft_s for r in results[name]) * 1e3:6.0f} ms   "
              f"{run.tokens_per_s:6.1f} tokens/s   ({run.tokens} tokens)")
    if len(best) == 2:
        ratio = best["parrot"].tokens_per_s / best["llamacpp"].tokens_per_s
        print(f"  Parrot / llama.cpp decode tokens/s: {ratio:.2f}x")


if __name__ == "__main__":
    main()
