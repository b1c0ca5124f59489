"""Write code, then a test for it: two LLM calls, the second reads the first's output.

Both calls are issued at once and return futures. The service sees the dependency
and starts the test call the moment the code is generated, with no client round
trip in between; the code enters the test prompt as the tokens the model generated.

    pip install -e .                                 # what it imports (embedded: serve too)
    python cookbook/code_and_test.py                 # embedded service, default model
    python cookbook/code_and_test.py --url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import time

import parrot as P


@P.semantic_function()
def write_code(task: P.Input, code: P.Output(max_tokens=96, stop=["```"])):
    """You are an expert software engineer.
    Write python code of {{input:task}}.
    Code:
    ```python
    {{output:code}}"""


@P.semantic_function()
def write_test(task: P.Input, code: P.Input, test: P.Output(max_tokens=96, stop=["```"])):
    """You are an experienced QA engineer. You write test code for {{input:task}}.
    Code:
    ```python
    {{input:code}}
    ```
    Your test code, using pytest:
    ```python
    {{output:test}}"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running Parrot service (default: start one in this process)")
    parser.add_argument("--task", default="a function that checks whether a string is a palindrome")
    args = parser.parse_args()

    with P.Parrot(args.url) as vm:
        started = time.perf_counter()
        task = vm.variable(args.task, name="task")
        code = write_code(task)  # returns at once: a future
        test = write_test(task, code)
        print(f"== code ==\n{code.get(perf=P.LATENCY).strip()}\n")
        print(f"== test ==\n{test.get(perf=P.LATENCY).strip()}\n")
        print(f"wall time: {time.perf_counter() - started:.2f} s")


if __name__ == "__main__":
    main()
