"""The ``parrot`` command: ``serve`` runs the HTTP service, ``engine`` an engine process that
registers with one, ``generate`` and ``chat`` talk to a model, ``cache`` manages converted models.

Imports of torch, transformers and the service happen inside the commands, so ``parrot --help``
and a mistyped option answer at once."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

from parrot.service import cli_checks
from parrot.service.cli_cache import cache_app
from parrot.service.cli_checks import DEFAULT_MODEL, OptionError
from parrot.service.observe.logs import LOG_FORMATS, use_log_format
from parrot.service.observe.top import top as top_command

try:  # typer >= 0.26 carries its own copy of click, whose exceptions it raises
    from typer import _click as click  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - older typer
    import click  # type: ignore[no-redef]

if TYPE_CHECKING:
    from parrot.service.engine.builtin.engine import BuiltinEngine, BuiltinEngineConfig
    from parrot.service.tenancy import Tenants


class _OneLineErrors(TyperGroup):
    """Usage mistakes (an unknown option, a value out of range) as one ``error:`` line on stderr,
    exit code 2, instead of a usage panel."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             windows_expand_args: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, windows_expand_args,
                                **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.format_message())
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            message = " ".join(exc.format_message().split())
            click.echo(f"error: {message}{hint}", err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


# Not on a terminal (a log, a pipe, CI), help is plain text that is never cut or wrapped;
# rich's panels would take 80 columns and cut option names to fit them.
_PLAIN = not sys.stdout.isatty()
app = typer.Typer(help="Parrot: serving LLM applications.", no_args_is_help=True,
                  pretty_exceptions_enable=False, cls=_OneLineErrors,
                  rich_markup_mode=None if _PLAIN else "rich",
                  context_settings={"terminal_width": 1000, "max_content_width": 1000} if _PLAIN else {})
app.add_typer(cache_app, name="cache")

# Idle keep-alive connections stay open this long. Clients pool connections (the SDK, the
# OpenAI clients, load balancers); with uvicorn's 5 s default, a client that reuses one just
# as the server closes it gets a broken read mid-request.
KEEP_ALIVE_S = 75

DEMO_PROMPT = "What is the capital of France? Answer in one sentence."

# BuiltinEngineConfig's defaults, here so that no option needs torch to show its default
# (a test keeps them equal).
DEFAULT_KV_CACHE_GIB = 2.0
DEFAULT_MAX_RUNNING = 64
DEFAULT_LATENCY_STEP_TOKENS = 32
DEFAULT_DRAIN_TIMEOUT_S = 30.0  # parrot.service.drain.DEFAULT_DRAIN_TIMEOUT_S

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
# A plain string checked up front, so a bad value fails in one line like other bad options.
AttentionOption = Annotated[str, typer.Option(
    "--attention-backend", help="Decode attention: torch, triton (Triton kernels; needs CUDA), or auto "
                                "(torch until the Triton kernels are verified on GPUs)")]
QuantizationOption = Annotated[str, typer.Option(
    help="Weights of the matmuls: auto (a GGUF model's own 4- and 8-bit blocks on CPU, anything else "
         "as it is), none (de-quantized float matrices), gguf, int4wo[-32|-64|-128|-256] or int8wo "
         "(weight-only, quantized at load)")]
PortOption = Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on")]
UrlOption = Annotated[str | None, typer.Option(
    envvar="PARROT_BASE_URL", show_envvar=True,
    help="A running Parrot service, e.g. http://127.0.0.1:8000 [default: run the model in this process]")]
ApiKeyOption = Annotated[str | None, typer.Option(envvar="PARROT_API_KEY", show_envvar=True,
                                                  help="The service's API key, if it needs one")]
# generate and chat: a model at --url, or one loaded in this process.
ClientModelOption = Annotated[str | None, typer.Option(
    help="With --url: a model the service serves [default: its default]; without: a Hugging Face "
         f"model folder or a .gguf file [default: {DEFAULT_MODEL}]")]
ClientLogLevelOption = Annotated[str, typer.Option(help="Log level: critical, error, warning, info, debug")]
MaxTokensOption = Annotated[int, typer.Option(min=1, help="Most tokens to generate")]
TemperatureOption = Annotated[float, typer.Option(min=0.0, help="0 is greedy")]
SeedOption = Annotated[int | None, typer.Option(help="Sampling seed")]


def engine_config(model: str | None, device: str = "auto", dtype: str = "auto",
                  kv_cache_gib: float = DEFAULT_KV_CACHE_GIB, max_running: int = DEFAULT_MAX_RUNNING,
                  latency_step_tokens: int = DEFAULT_LATENCY_STEP_TOKENS,
                  prefix_caching: bool = True, attention_backend: str = "auto",
                  quantization: str = "auto") -> BuiltinEngineConfig:
    """The builtin engine's config from command-line options, each checked first (OptionError)."""
    cli_checks.check_model(model)
    cli_checks.check_quantization(quantization)
    cli_checks.check_dtype(dtype)
    cli_checks.check_attention_backend(attention_backend)
    cli_checks.check_positive("--kv-cache-gib", kv_cache_gib)
    cli_checks.check_device(device)
    from parrot.service.engine.builtin.engine import BuiltinEngineConfig

    return BuiltinEngineConfig(
        model=model, device=device, dtype=dtype, kv_cache_gib=kv_cache_gib, max_running=max_running,
        latency_step_tokens=latency_step_tokens or None, prefix_caching=prefix_caching,
        attention_backend=attention_backend,  # type: ignore[arg-type]  # checked above
        quantization=quantization,
    )


def load_engine(console: Console, config: BuiltinEngineConfig, threads: int | None = None) -> BuiltinEngine:
    """Build the builtin engine behind a spinner; a bad model or option exits with a message."""
    from parrot.service.engine.builtin import engine as builtin
    from parrot.service.engine.builtin.loader import quiet_transformers

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    with console.status(f"Loading {config.model or DEFAULT_MODEL} ..."), quiet_transformers():
        try:
            engine = builtin.BuiltinEngine(config)
        # A missing model (FileNotFoundError), a bad dtype or architecture (ValueError), a device
        # that cannot hold it (torch's RuntimeError, out of memory included).
        except (OSError, ValueError, RuntimeError) as exc:
            raise typer.Exit(_fail(console, str(exc))) from None
    console.print(
        f"Loaded [bold]{engine.model_name}[/] on {engine.device} "
        f"(context {engine.max_context_len} tokens)"
    )
    return engine


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: PortOption = 8000,
    model: ModelOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    kv_cache_gib: KVCacheOption = DEFAULT_KV_CACHE_GIB,
    max_running: MaxRunningOption = DEFAULT_MAX_RUNNING,
    latency_step_tokens: LatencyStepOption = DEFAULT_LATENCY_STEP_TOKENS,
    prefix_caching: PrefixCachingOption = True,
    attention_backend: AttentionOption = "auto",
    quantization: QuantizationOption = "auto",
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
    log_level: Annotated[str, typer.Option(
        help="Log level (the service's and uvicorn's): critical, error, warning, info, debug")] = "info",
    log_format: Annotated[str, typer.Option(
        help="Log lines: text (readable) or json (one object per line); both carry the tenant, "
             "session, call and request ids")] = "text",
    log_prompts: Annotated[bool, typer.Option(
        help="Put prompt and output text in the request log lines (never, by default)")] = False,
    prefill_ahead_min_tokens: Annotated[int | None, typer.Option(
        min=0, show_default=False,
        help="Prefill the known prompt start of a call still waiting for its inputs when it has "
             "at least this many tokens (0: never) [default: 16]")] = None,
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
    from parrot.service.engine.factory import (
        EngineSpecError,
        ServiceConfig,
        build_engine,
        load_config,
        parse_engine_spec,
    )
    from parrot.service.tenancy import TenantsFileError

    console = _console()
    try:
        cli_checks.check_log_level(log_level)
        if log_format not in LOG_FORMATS:
            raise OptionError(f"--log-format: {log_format!r} is not one of {', '.join(LOG_FORMATS)}")
        access = tenants_from_options(api_key, tenants, admin_key, cluster_secret)
        service_config = load_config(config) if config else ServiceConfig()
        specs = [*service_config.engines, *(parse_engine_spec(e) for e in engine or ())]
        if local_engine is None:
            local_engine = True if service_config.local_engine is None else service_config.local_engine
        builtin = (engine_config(model, device, dtype, kv_cache_gib, max_running, latency_step_tokens,
                                 prefix_caching, attention_backend, quantization) if local_engine else None)
        cli_checks.check_listen(host, port)
    except (OptionError, TenantsFileError, EngineSpecError) as exc:
        raise typer.Exit(_fail(console, str(exc))) from None
    cli_checks.configure_logging(log_level)
    use_log_format(log_format)  # type: ignore[arg-type]  # checked above
    # The app's imports take seconds: only once every option has been checked.
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    from parrot.service.app import create_app
    from parrot.service.engine.base import Engine
    from parrot.service.runtime.executor import PREFILL_AHEAD_MIN_TOKENS
    from parrot.service.server import DrainingServer

    engines: list[Engine] = []
    if builtin is not None:
        engines.append(load_engine(console, builtin, threads))
    for spec in specs:
        try:
            engines.append(build_engine(spec, engines))
        except EngineSpecError as exc:
            raise typer.Exit(_fail(console, str(exc))) from None
        console.print(f"Engine [bold]{spec.kind}[/] at {spec.url} serving {engines[-1].model_name}")
    console.print(access_line(access), highlight=False)
    if prefill_ahead_min_tokens is None:
        prefill_ahead_min_tokens = PREFILL_AHEAD_MIN_TOKENS
    service = create_app(engines, tenants=access, log_prompts=log_prompts,
                         prefill_ahead_min_tokens=prefill_ahead_min_tokens or None)
    # Drains on SIGTERM/SIGINT before uvicorn stops: see parrot.service.server.
    # Not ``config``: that name is the --config file option here.
    server_config = uvicorn.Config(service, host=host, port=port, log_level=log_level.lower(),
                                   timeout_keep_alive=KEEP_ALIVE_S,
                                   # json: uvicorn's own lines go through the root handler's format too
                                   log_config=None if log_format == "json" else LOGGING_CONFIG)
    server = DrainingServer(server_config, service.state.drain, drain_timeout)

    async def run() -> None:
        serving = asyncio.create_task(server.serve())
        if demo:
            base_url = f"http://{_connect_host(host)}:{port}"
            if await _wait_until_up(base_url, serving):
                await run_demo(base_url, Console(soft_wrap=True))
        await serving

    asyncio.run(run())


def tenants_from_options(api_key: str | None, tenants_file: str | None, admin_key: str | None,
                         cluster_secret: str | None) -> Tenants:
    """The service's tenants and operator credentials (a bad file raises TenantsFileError)."""
    from parrot.service.tenancy import Tenants, TenantsFileError, load_tenants

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
    import httpx

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
    import httpx

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
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on (0: any free port)")] = 0,
    advertise_url: Annotated[str | None, typer.Option(
        help="URL the service reaches this engine at [default: http://HOST:PORT]")] = None,
    model: ModelOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    kv_cache_gib: KVCacheOption = DEFAULT_KV_CACHE_GIB,
    max_running: MaxRunningOption = DEFAULT_MAX_RUNNING,
    latency_step_tokens: LatencyStepOption = DEFAULT_LATENCY_STEP_TOKENS,
    prefix_caching: PrefixCachingOption = True,
    attention_backend: AttentionOption = "auto",
    quantization: QuantizationOption = "auto",
    threads: ThreadsOption = None,
    log_level: Annotated[str, typer.Option(
        help="Log level (the engine's and uvicorn's): critical, error, warning, info, debug")] = "warning",
    cluster_secret: Annotated[str | None, typer.Option(
        help="The service's --cluster-secret (or --admin-key), sent to register and heartbeat")] = None,
) -> None:
    """Run an engine process that registers with a Parrot service and heartbeats its load."""
    import socket

    console = _console()
    try:
        cli_checks.check_url("--service", service)
        cli_checks.check_url("--advertise-url", advertise_url)
        cli_checks.check_log_level(log_level)
        config = engine_config(model, device, dtype, kv_cache_gib, max_running, latency_step_tokens,
                               prefix_caching, attention_backend, quantization)
        cli_checks.check_listen(host, port)
    except OptionError as exc:
        raise typer.Exit(_fail(console, str(exc))) from None
    cli_checks.configure_logging(log_level)
    import uvicorn

    from parrot.service.engine.remote.worker import create_worker_app

    loaded = load_engine(console, config, threads)
    if port == 0:
        with socket.socket() as sock:  # a free port now; the tiny race is acceptable for a CLI
            sock.bind((host, 0))
            port = sock.getsockname()[1]
    url = advertise_url or f"http://{_connect_host(host)}:{port}"
    app = create_worker_app(loaded, service_url=service, advertise_url=url, cluster_secret=cluster_secret)
    console.print(f"Engine listening on {url}, registering with {service}")
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), timeout_keep_alive=KEEP_ALIVE_S)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt (a user message with --chat)")],
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    max_tokens: MaxTokensOption = 64,
    temperature: TemperatureOption = 0.0,
    seed: SeedOption = None,
    model: ClientModelOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    quantization: QuantizationOption = "auto",
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the model's chat template")] = True,
    log_level: ClientLogLevelOption = "warning",
) -> None:
    """Generate one completion and print it as it streams: from a running service (--url, or
    PARROT_BASE_URL), else from the model loaded in this process."""
    from parrot.service import cli_client

    sampling = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}
    source, close = _reply_source(url, api_key, model, device, dtype, quantization, log_level, sampling,
                                  "generate")
    try:
        asyncio.run(_with_engine(close, cli_client.print_reply(source, (
            [{"role": "user", "content": prompt}] if chat else prompt), sys.stdout)))
    except cli_client.ClientError as exc:
        raise typer.Exit(_fail(_console(), str(exc))) from None


@app.command("chat")
def chat_command(
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    system: Annotated[str | None, typer.Option(help="A system message that starts the conversation")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens in one reply")] = 256,
    temperature: TemperatureOption = 0.0,
    seed: SeedOption = None,
    model: ClientModelOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    quantization: QuantizationOption = "auto",
    log_level: ClientLogLevelOption = "warning",
) -> None:
    """Chat with a model: each line you type is a message, the reply streams, the conversation is
    kept. /exit or end of input (Ctrl-D) ends it, /clear starts over. Uses a running service
    (--url, or PARROT_BASE_URL), else the model loaded in this process."""
    from parrot.service import cli_client

    sampling = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}
    source, close = _reply_source(url, api_key, model, device, dtype, quantization, log_level, sampling,
                                  "chat")
    try:
        asyncio.run(_with_engine(close, cli_client.chat_loop(source, system, sys.stdin, sys.stdout,
                                                             sys.stderr)))
    except cli_client.ClientError as exc:
        raise typer.Exit(_fail(_console(), str(exc))) from None


def _reply_source(url: str | None, api_key: str | None, model: str | None, device: str, dtype: str,
                  quantization: str, log_level: str, sampling: dict[str, Any],
                  command: str) -> tuple[Any, BuiltinEngine | None]:
    """Where ``generate`` and ``chat`` get replies: (a reply source, the engine to start and shut
    down around it, if it runs in this process)."""
    from parrot.service import cli_client

    console = _console()
    try:
        cli_checks.check_url("--url", url)
        cli_checks.check_log_level(log_level)
        config = None if url else engine_config(model, device, dtype, quantization=quantization)
    except OptionError as exc:
        raise typer.Exit(_fail(console, str(exc))) from None
    cli_checks.configure_logging(log_level)
    if url:
        client = cli_client.ServiceClient(url, api_key, model, **sampling)
        try:
            client.check()
        except cli_client.ClientError as exc:
            raise typer.Exit(_fail(console, str(exc))) from None
        return client.reply, None
    console.print(f"No --url or PARROT_BASE_URL: running the model in this process (slow to start; "
                  f"`parrot serve` once, then `parrot {command} --url http://127.0.0.1:8000`)",
                  highlight=False)
    assert config is not None
    engine = load_engine(console, config)
    return cli_client.engine_replies(engine, max_new_tokens=sampling["max_tokens"],
                                     temperature=sampling["temperature"], seed=sampling["seed"]), engine


async def _with_engine(engine: BuiltinEngine | None, work: Any) -> Any:
    if engine is None:
        return await work
    await engine.start()
    try:
        return await work
    finally:
        await engine.shutdown()


app.command("top")(top_command)


def _console() -> Console:
    # soft_wrap: a long line stays one line in a log, whatever the width rich guesses.
    return Console(stderr=True, soft_wrap=True)


def _fail(console: Console, message: str) -> int:
    # One line, as written: no wrapping, and brackets in the message are not markup.
    console.print(Text.assemble(("error: ", "red"), message), soft_wrap=True)
    return 1
