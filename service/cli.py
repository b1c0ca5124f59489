"""The ``parrot`` command: ``serve`` runs the HTTP service, ``engine`` an engine process that
registers with one, ``generate`` runs one prompt."""

from __future__ import annotations

import asyncio
from typing import Annotated, cast

import httpx
import typer
from rich.console import Console
from rich.text import Text

from parrot.service.drain import DEFAULT_DRAIN_TIMEOUT_S
from parrot.service.engine.base import Engine
from parrot.service.engine.builtin.engine import BuiltinEngine, BuiltinEngineConfig
from parrot.service.engine.builtin.loader import DEFAULT_MODEL
from parrot.service.engine.builtin.model import AttentionBackendOption
from parrot.service.engine.factory import (
    EngineSpecError,
    ServiceConfig,
    build_engine,
    load_config,
    parse_engine_spec,
)
from parrot.service.tenancy import Tenants, TenantsFileError, load_tenants

app = typer.Typer(help="Parrot: serving LLM applications.", no_args_is_help=True,
                  pretty_exceptions_enable=False)

# Idle keep-alive connections stay open this long. Clients pool connections (the SDK, the
# OpenAI clients, load balancers); with uvicorn's 5 s default, a client that reuses one just
# as the server closes it gets a broken read mid-request.
KEEP_ALIVE_S = 75

DEMO_PROMPT = "What is the capital of France? Answer in one sentence."

_DEFAULTS = BuiltinEngineConfig()
ModelOption = Annotated[
    str | None,
    typer.Option(help=f"A Hugging Face model folder or a .gguf file [default: {DEFAULT_MODEL}]"),
]
DeviceOption = Annotated[str, typer.Option(help="cpu, cuda, cuda:N, or auto")]
DtypeOption = Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16")]
KVCacheOption = Annotated[float, typer.Option(help="Memory for the KV cache, in GiB")]
MaxRunningOption = Annotated[int, typer.Option(min=1, help="Most requests in one batch")]
LatencyStepOption = Annotated[int, typer.Option(
    min=0, help="Tokens a step may hold while latency-critical requests run; throughput requests "
                "get what they leave (0: no objective-aware batching)")]
PrefixCachingOption = Annotated[bool, typer.Option(help="Reuse cached KV of shared prompt prefixes")]
ThreadsOption = Annotated[int | None, typer.Option(min=1, help="CPU threads for torch [default: all]")]
# A plain string checked by the engine, so a bad value fails in one line like other bad options.
AttentionOption = Annotated[str, typer.Option(
    "--attention-backend", help="Decode attention: torch, triton (Triton kernels; needs CUDA), or auto "
                                "(torch until the Triton kernels are verified on GPUs)")]


def engine_config(model: str | None, device: str = "auto", dtype: str = "auto",
                  kv_cache_gib: float = _DEFAULTS.kv_cache_gib, max_running: int = _DEFAULTS.max_running,
                  latency_step_tokens: int = _DEFAULTS.latency_step_tokens or 0,
                  prefix_caching: bool = True,
                  attention_backend: str = _DEFAULTS.attention_backend) -> BuiltinEngineConfig:
    return BuiltinEngineConfig(
        model=model, device=device, dtype=dtype, kv_cache_gib=kv_cache_gib, max_running=max_running,
        latency_step_tokens=latency_step_tokens or None, prefix_caching=prefix_caching,
        # Validated where the engine resolves it (BuiltinEngine), before the model loads.
        attention_backend=cast(AttentionBackendOption, attention_backend),
    )


def load_engine(console: Console, config: BuiltinEngineConfig, threads: int | None = None) -> BuiltinEngine:
    """Build the builtin engine behind a spinner; a bad model or option exits with a message."""
    from transformers.utils import logging as hf_logging

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()  # the spinner says it already
    model = config.model
    with console.status(f"Loading {model or DEFAULT_MODEL} ..."):
        try:
            engine = BuiltinEngine(config)
        except (OSError, ValueError) as exc:  # missing model (FileNotFoundError), bad dtype/arch
            raise typer.Exit(_fail(console, str(exc))) from None
    console.print(
        f"Loaded [bold]{engine.model_name}[/] on {engine.device} "
        f"(context {engine.max_context_len} tokens)"
    )
    return engine


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on")] = 8000,
    model: ModelOption = None,
    device: DeviceOption = _DEFAULTS.device,
    dtype: DtypeOption = _DEFAULTS.dtype,
    kv_cache_gib: KVCacheOption = _DEFAULTS.kv_cache_gib,
    max_running: MaxRunningOption = _DEFAULTS.max_running,
    latency_step_tokens: LatencyStepOption = _DEFAULTS.latency_step_tokens or 0,
    prefix_caching: PrefixCachingOption = True,
    attention_backend: AttentionOption = _DEFAULTS.attention_backend,
    threads: ThreadsOption = None,
    engine: Annotated[list[str] | None, typer.Option(
        "--engine", help="An engine server behind the service, as KIND=URL: sglang=http://HOST:PORT "
                         "(SGLang's native API) or openai=http://HOST:PORT/v1 (any OpenAI-compatible "
                         "server); repeatable")] = None,
    config: Annotated[str | None, typer.Option(
        help="A TOML file of engines with per-engine options (see docs/deploy.md)")] = None,
    local_engine: Annotated[bool | None, typer.Option(
        help="Run the builtin engine in this process [default: yes, unless the config file says "
             "no]; without any engine, requests wait for engine processes (parrot engine "
             "--service URL)")] = None,
    demo: Annotated[bool, typer.Option(help="Once up, send one chat request to itself and "
                                            "print it")] = False,
    drain_timeout: Annotated[float, typer.Option(
        min=0.0, help="On SIGTERM or Ctrl-C, seconds in-flight work gets to finish (new work gets "
                      "503) before what is left is cancelled; a second signal cancels at once")
    ] = DEFAULT_DRAIN_TIMEOUT_S,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
    api_key: Annotated[str | None, typer.Option(
        help="Require this key (Authorization: Bearer or x-api-key) on the native and OpenAI "
             "routes: one tenant, no limits")] = None,
    tenants: Annotated[str | None, typer.Option(
        help="A TOML file of tenants, their keys and limits (see the README)")] = None,
    admin_key: Annotated[str | None, typer.Option(
        help="Operator key for the engine routes (register, heartbeat, remove, list)")] = None,
    cluster_secret: Annotated[str | None, typer.Option(
        help="Secret engine processes send to register (parrot engine --cluster-secret); "
             "an operator credential like --admin-key")] = None,
) -> None:
    """Serve the native and OpenAI-compatible APIs (and /healthz, /metrics, /v1/engines) over HTTP."""
    import uvicorn

    from parrot.service.app import create_app
    from parrot.service.server import DrainingServer

    console = Console(stderr=True)
    try:
        access = tenants_from_options(api_key, tenants, admin_key, cluster_secret)
    except TenantsFileError as exc:
        raise typer.Exit(_fail(console, str(exc))) from None
    try:
        service_config = load_config(config) if config else ServiceConfig()
        specs = [*service_config.engines, *(parse_engine_spec(e) for e in engine or ())]
    except EngineSpecError as exc:
        raise typer.Exit(_fail(console, str(exc))) from None
    if local_engine is None:
        local_engine = True if service_config.local_engine is None else service_config.local_engine
    engines: list[Engine] = []
    if local_engine:
        builtin = engine_config(model, device, dtype, kv_cache_gib, max_running, latency_step_tokens,
                                prefix_caching, attention_backend)
        engines.append(load_engine(console, builtin, threads))
    for spec in specs:
        try:
            engines.append(build_engine(spec, engines))
        except EngineSpecError as exc:
            raise typer.Exit(_fail(console, str(exc))) from None
        console.print(f"Engine [bold]{spec.kind}[/] at {spec.url} serving {engines[-1].model_name}")
    console.print(access_line(access), highlight=False)
    service = create_app(engines, tenants=access)
    # Drains on SIGTERM/SIGINT before uvicorn stops: see parrot.service.server.
    # Not ``config``: that name is the --config file option here.
    server_config = uvicorn.Config(service, host=host, port=port, log_level=log_level,
                                   timeout_keep_alive=KEEP_ALIVE_S)
    server = DrainingServer(server_config, service.state.drain, drain_timeout)

    async def run() -> None:
        serving = asyncio.create_task(server.serve())
        if demo:
            base_url = f"http://{_connect_host(host)}:{port}"
            if await _wait_until_up(base_url, serving):
                await run_demo(base_url, Console())
        await serving

    asyncio.run(run())


def tenants_from_options(api_key: str | None, tenants_file: str | None, admin_key: str | None,
                         cluster_secret: str | None) -> Tenants:
    """The service's tenants and operator credentials (a bad file raises TenantsFileError)."""
    if api_key is not None and tenants_file is not None:
        raise TenantsFileError("--api-key and --tenants are alternatives; give one")
    admin = [k for k in (admin_key, cluster_secret) if k]
    if tenants_file is not None:
        return Tenants(load_tenants(tenants_file), admin_keys=admin)
    if api_key:
        return Tenants.single_key(api_key, admin_keys=admin)
    return Tenants(admin_keys=admin)


def access_line(access: Tenants) -> str:
    """One start-up line saying who may use the service."""
    operator = "engine routes need the operator credential"
    if not access.operator_required:
        return ("No API keys configured: anyone who can reach this port can use the service and "
                "register engines")
    if not access.keys_required:
        return f"No API keys configured: anyone who can reach this port can use the service; {operator}"
    if access.has_operator:
        return f"API keys required (tenants: {', '.join(access.by_name)}); {operator}"
    return (f"API keys required (tenants: {', '.join(access.by_name)}); engine routes are closed "
            "(no --admin-key or --cluster-secret)")


def _connect_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


async def _wait_until_up(base_url: str, serving: asyncio.Task, timeout_s: float = 60.0) -> bool:
    async with httpx.AsyncClient(timeout=2.0) as client:
        for _ in range(int(timeout_s / 0.1)):
            if serving.done():
                return False
            try:
                if (await client.get(f"{base_url}/healthz")).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    return False


async def run_demo(base_url: str, console: Console, prompt: str = DEMO_PROMPT,
                   max_tokens: int = 64) -> str:
    """Send one chat completion to a running server and print the prompt and the answer."""
    async with httpx.AsyncClient(base_url=base_url, timeout=120.0) as client:
        resp = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0,
        })
    if resp.status_code != 200:
        console.print(f"[red]demo request failed ({resp.status_code}):[/] {resp.text}")
        return ""
    body = resp.json()
    answer = body["choices"][0]["message"]["content"]
    console.print(f"[bold]demo[/] POST {base_url}/v1/chat/completions")
    console.print(f"[bold cyan]prompt:[/] {prompt}", markup=True, highlight=False)
    console.print("[bold green]answer:[/] ", end="")
    console.print(answer, markup=False, highlight=False)
    console.print(f"[dim]{body['usage']['completion_tokens']} tokens; the server keeps running "
                  f"(Ctrl-C to stop)[/]")
    return answer


@app.command("engine")
def engine_process(
    service: Annotated[str, typer.Option(help="The Parrot service to register with, e.g. "
                                              "http://127.0.0.1:8000")],
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port)")] = 0,
    advertise_url: Annotated[str | None, typer.Option(
        help="URL the service reaches this engine at [default: http://HOST:PORT]")] = None,
    model: ModelOption = None,
    device: DeviceOption = _DEFAULTS.device,
    dtype: DtypeOption = _DEFAULTS.dtype,
    kv_cache_gib: KVCacheOption = _DEFAULTS.kv_cache_gib,
    max_running: MaxRunningOption = _DEFAULTS.max_running,
    latency_step_tokens: LatencyStepOption = _DEFAULTS.latency_step_tokens or 0,
    prefix_caching: PrefixCachingOption = True,
    attention_backend: AttentionOption = _DEFAULTS.attention_backend,
    threads: ThreadsOption = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "warning",
    cluster_secret: Annotated[str | None, typer.Option(
        help="The service's --cluster-secret (or --admin-key), sent to register and heartbeat")] = None,
) -> None:
    """Run an engine process that registers with a Parrot service and heartbeats its load."""
    import socket

    import uvicorn

    from parrot.service.engine.remote.worker import create_worker_app

    console = Console(stderr=True)
    config = engine_config(model, device, dtype, kv_cache_gib, max_running, latency_step_tokens,
                           prefix_caching, attention_backend)
    loaded = load_engine(console, config, threads)
    if port == 0:
        with socket.socket() as sock:  # a free port now; the tiny race is acceptable for a CLI
            sock.bind((host, 0))
            port = sock.getsockname()[1]
    url = advertise_url or f"http://{_connect_host(host)}:{port}"
    app = create_worker_app(loaded, service_url=service, advertise_url=url, cluster_secret=cluster_secret)
    console.print(f"Engine listening on {url}, registering with {service}")
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=KEEP_ALIVE_S)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt (a user message with --chat)")],
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens to generate")] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 is greedy")] = 0.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed")] = None,
    model: ModelOption = None,
    device: DeviceOption = _DEFAULTS.device,
    dtype: DtypeOption = _DEFAULTS.dtype,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the model's chat template")] = True,
) -> None:
    """Generate one completion in-process (no server) and print it as it streams."""
    from parrot.service.engine.base import GenerateRequest, InvalidRequestError, SamplingParams

    console = Console(stderr=True)
    engine = load_engine(console, engine_config(model, device, dtype))

    async def run() -> None:
        ids = (engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if chat
               else engine.tokenizer.encode(prompt))
        sampling = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, seed=seed)
        await engine.start()
        try:
            request = GenerateRequest(engine.new_request_id(), ids, sampling)
            async for out in engine.generate(request):
                if out.error:
                    raise typer.Exit(_fail(console, out.error))
                typer.echo(out.text, nl=out.finished)
        finally:
            await engine.shutdown()

    try:
        asyncio.run(run())
    except InvalidRequestError as exc:
        raise typer.Exit(_fail(console, str(exc))) from None


def _fail(console: Console, message: str) -> int:
    # One line, as written: no wrapping, and brackets in the message are not markup.
    console.print(Text.assemble(("error: ", "red"), message), soft_wrap=True)
    return 1
