"""The `tokenmill` command: `env`, `conformance` and (with the serving layer) `serve`.

Flags fall back to environment variables here, in one place; nothing below the CLI reads the
environment.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from tokenmill import __version__

logger = logging.getLogger("tokenmill")


def _add_backend_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        default=os.environ.get("TOKENMILL_BACKEND") or None,
        help="force this backend plugin instead of the best discovered one [env: TOKENMILL_BACKEND]",
    )


def _cmd_env(args: argparse.Namespace) -> int:
    from tokenmill.env_report import print_report
    from tokenmill.registry import load_registry

    print_report(load_registry(), args.backend, args.json)
    return 0


def _cmd_conformance(args: argparse.Namespace) -> int:
    from tokenmill.conformance.runner import run_conformance

    return run_conformance(args.backend or "", [a for a in args.extra_args if a != "--"], interpret=args.interpret)


def _env(name: str, default=None):
    return os.environ.get(name, default)


ENGINE_FLAGS = ("--model-id", "--dtype", "--quantize", "--kv-cache-bytes", "--max-batch-prefill-tokens",
                "--max-batch-size", "--max-total-tokens", "--max-batch-total-tokens", "--cache-dir",
                "--cuda-memory-fraction", "--cuda-graphs", "--load-format")


def fraction(text: str) -> float:
    """A share of device memory: a number in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {text}")
    return value


def batch_sizes(text: str) -> tuple[int, ...]:
    """TGI's `--cuda-graphs`: comma-separated decode batch sizes to capture; "0" captures none."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if sizes == [0]:
        return ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive batch sizes such as 1,2,4,8 (or 0 for no graphs), got {text!r}")
    return tuple(sorted(set(sizes)))


def load_format(text: str) -> str:
    from tokenmill.loader import LOAD_FORMATS

    if text not in LOAD_FORMATS:
        raise argparse.ArgumentTypeError(f"choose {' or '.join(LOAD_FORMATS)}, got {text!r}")
    return text


def _engine_config(args: argparse.Namespace) -> "EngineConfig":
    from pathlib import Path

    from tokenmill.engine import EngineConfig

    return EngineConfig(
        model_id=args.model_id, dtype=args.dtype, backend=args.backend, kv_cache_bytes=args.kv_cache_bytes,
        max_num_batched_tokens=args.max_batch_prefill_tokens, max_num_seqs=args.max_batch_size,
        max_model_len=args.max_total_tokens, enable_prefix_caching=args.prefix_caching, quantize=args.quantize,
        cache_dir=Path(args.cache_dir).expanduser(), max_batch_total_tokens=args.max_batch_total_tokens,
        memory_fraction=args.cuda_memory_fraction, graph_batch_sizes=args.cuda_graphs, load_format=args.load_format,
    )


def _model_server_args(args: argparse.Namespace) -> tuple[str, ...]:
    """The engine flags this command was given, passed on to the model server it launches."""
    forwarded = []
    for flag in ENGINE_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if isinstance(value, tuple):
            value = ",".join(map(str, value)) or "0"
        if value is not None:
            forwarded += [flag, str(value)]
    if args.backend:
        forwarded += ["--backend", args.backend]
    if not args.prefix_caching:
        forwarded.append("--no-prefix-caching")
    return tuple(forwarded)


def _cmd_serve(args: argparse.Namespace) -> int:
    servers = tuple(args.model_server) or tuple(a for a in (_env("MODEL_SERVERS") or "").split(",") if a)
    model_server_args = _model_server_args(args) + (("--otlp-endpoint", args.otlp_endpoint)
                                                    if args.otlp_endpoint else ())
    launched = None
    if not servers:  # start the child first: its start-up then overlaps the router's imports below
        from tokenmill.api.launch import start_model_server

        launched = start_model_server(model_server_args)

    from tokenmill.api.server import ServeOptions, serve
    from tokenmill.api.tracing import setup_tracing

    setup_tracing(args.otlp_endpoint, "tokenmill.router")
    options = ServeOptions(
        engine=_engine_config(args), hostname=args.hostname, port=args.port, grpc_port=args.grpc_port or None,
        max_input_tokens=args.max_input_tokens, max_total_tokens=args.max_total_tokens,
        max_concurrent_requests=args.max_concurrent_requests, max_best_of=args.max_best_of,
        max_stop_sequences=args.max_stop_sequences, max_top_n_tokens=args.max_top_n_tokens,
        max_client_batch_size=args.max_client_batch_size, payload_limit=args.payload_limit, api_key=args.api_key,
        cors_allow_origin=tuple(args.cors_allow_origin), model_servers=servers,
        model_server_args=model_server_args, graceful_shutdown_s=args.graceful_termination_timeout,
    )
    serve(options, launched)
    return 0


def _cmd_model_server(args: argparse.Namespace) -> int:
    import asyncio

    from tokenmill.api.grpc.model_server import run_model_server
    from tokenmill.api.tracing import setup_tracing
    from tokenmill.errors import TokenmillError

    setup_tracing(args.otlp_endpoint, "tokenmill.model_server")
    try:
        asyncio.run(run_model_server(_engine_config(args), args.listen, args.model_id or "",
                                     grace_s=args.graceful_termination_timeout, parent_pid=args.parent_pid))
    except TokenmillError as exc:
        print(f"tokenmill model-server: {exc}", file=sys.stderr)
        return 2
    return 0


def _flag_adder(parser: argparse.ArgumentParser):
    def flag(name: str, env: str, default=None, type=str, help: str = "", aliases: tuple[str, ...] = ()) -> None:
        # The variable's text is the default as given: argparse converts it through `type`, so a bad value
        # is reported like a bad flag instead of raising while the parser is built.
        value = _env(env)
        parser.add_argument(name, *aliases, default=value if value is not None else default, type=type,
                            help=f"{help} [env: {env}]")
    return flag


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """How the model is loaded and scheduled; TGI's names and environment variables where TGI has them."""
    flag = _flag_adder(parser)
    flag("--model-id", "MODEL_ID", None, help="local folder, .gguf file or cached hub id (default: embedded SmolLM2)")
    flag("--dtype", "DTYPE", "auto", help="auto, float32, bfloat16 or float16")
    flag("--quantize", "QUANTIZE", None, help="a quantization method the backend offers (cpu: int8)")
    flag("--max-total-tokens", "MAX_TOTAL_TOKENS", None, int, help="longest prompt + generation")
    flag("--max-batch-prefill-tokens", "MAX_BATCH_PREFILL_TOKENS", 2048, int, help="tokens per engine step")
    flag("--max-batch-size", "MAX_BATCH_SIZE", 128, int, help="sequences per engine step")
    flag("--kv-cache-bytes", "KV_CACHE_BYTES", None, int, help="KV-cache size (default: the backend's budget)")
    flag("--max-batch-total-tokens", "MAX_BATCH_TOTAL_TOKENS", None, int,
         help="most tokens held in the KV cache at once (default: what the KV-cache budget holds)")
    flag("--cache-dir", "TOKENMILL_CACHE_DIR", "~/.cache/tokenmill", help="where derived files are cached")
    flag("--cuda-memory-fraction", "CUDA_MEMORY_FRACTION", 1.0, fraction, aliases=("--gpu-memory-utilization",),
         help="share of the accelerator's memory for weights, activations and KV cache together (vLLM's "
              "--gpu-memory-utilization is the same); the KV cache gets what the backend's profiling leaves")
    flag("--cuda-graphs", "CUDA_GRAPHS", None, batch_sizes,
         help="decode batch sizes to capture as graphs, comma-separated, e.g. 1,2,4,8; 0: none "
              "(default: the backend's choice)")
    flag("--load-format", "LOAD_FORMAT", "auto", load_format,
         help="auto: read the checkpoint; dummy: random weights for --model-id's config (a folder with "
              "config.json, or a built-in shape: llama-3-8b), for benchmarks; no weight file is read")
    flag("--otlp-endpoint", "OTLP_ENDPOINT", None, help="export OpenTelemetry spans over OTLP/gRPC")
    flag("--graceful-termination-timeout", "GRACEFUL_TERMINATION_TIMEOUT", 30, int,
         help="seconds in-flight requests get to finish on SIGTERM")
    prefix = _env("PREFIX_CACHING", "1") not in ("0", "false", "False")
    parser.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false", default=prefix,
                        help="disable automatic prefix caching [env: PREFIX_CACHING=0]")


def _add_serve_flags(serve: argparse.ArgumentParser) -> None:
    """The router's flags, named as TGI's launcher names them, each with TGI's environment variable."""
    _add_engine_flags(serve)
    flag = _flag_adder(serve)
    flag("--hostname", "HOSTNAME", "0.0.0.0", help="address to listen on")
    flag("--port", "PORT", 3000, int, help="HTTP port")
    flag("--grpc-port", "GRPC_PORT", 3001, int, help="public gRPC port (0: no gRPC server)")
    flag("--max-input-tokens", "MAX_INPUT_TOKENS", None, int, help="longest prompt")
    flag("--max-concurrent-requests", "MAX_CONCURRENT_REQUESTS", 128, int, help="beyond this, 429")
    flag("--max-best-of", "MAX_BEST_OF", 2, int, help="largest best_of")
    flag("--max-stop-sequences", "MAX_STOP_SEQUENCES", 4, int, help="most stop sequences per request")
    flag("--max-top-n-tokens", "MAX_TOP_N_TOKENS", 5, int, help="largest top_n_tokens")
    flag("--max-client-batch-size", "MAX_CLIENT_BATCH_SIZE", 4, int, help="most prompts per /v1/completions")
    flag("--payload-limit", "PAYLOAD_LIMIT", 2_000_000, int, help="largest request body in bytes")
    flag("--api-key", "API_KEY", None, help="require 'Authorization: Bearer KEY' on generation routes")
    flag("--waiting-served-ratio", "WAITING_SERVED_RATIO", 0.3, float,
         help="accepted for TGI compatibility; like TGI with chunked prefill, it has no effect")
    serve.add_argument("--cors-allow-origin", action="append", default=[], help="allowed CORS origin (repeatable)")
    serve.add_argument("--model-server", action="append", default=[],
                       help="front this running model server instead of launching one (repeatable) "
                            "[env: MODEL_SERVERS, comma-separated]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description="LLM inference server with pluggable hardware backends")
    parser.add_argument("--version", action="version", version=f"tokenmill {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"),
                        help="logging level [env: LOG_LEVEL]")
    parser.add_argument("--json-output", action="store_true",
                        default=os.environ.get("JSON_OUTPUT", "") not in ("", "0", "false"),
                        help="log one JSON object per line [env: JSON_OUTPUT]")
    commands = parser.add_subparsers(dest="command", required=True)

    env = commands.add_parser("env", help="list the backend plugins, their devices and which one would be chosen")
    _add_backend_flag(env)
    env.add_argument("--json", action="store_true", help="print the report as JSON")
    env.set_defaults(func=_cmd_env)

    conformance = commands.add_parser(
        "conformance", help="run the conformance suite every backend must pass (needs tokenmill[test])")
    _add_backend_flag(conformance)
    conformance.add_argument("--interpret", action="store_true",
                             help="run the kernel-level cases through the backend's kernel interpreter on the CPU, "
                                  "without its hardware (the backend must offer one, e.g. Triton's)")
    conformance.set_defaults(accepts_extra_args=True)  # anything unrecognised goes to pytest, e.g. -q, -k
    conformance.set_defaults(func=_cmd_conformance)
    serve = commands.add_parser("serve", help="start the server on the best discovered backend")
    _add_backend_flag(serve)
    _add_serve_flags(serve)
    serve.set_defaults(func=_cmd_serve)

    model_server = commands.add_parser("model-server", help="serve one engine replica over the internal gRPC protocol")
    _add_backend_flag(model_server)
    _add_engine_flags(model_server)
    _flag_adder(model_server)("--listen", "MODEL_SERVER_LISTEN", "unix:///tmp/tokenmill-model-server.sock",
                              help="unix:///path or host:port")
    model_server.add_argument("--parent-pid", type=int, default=None,
                              help="stop when this process (the launcher) is gone; set by `tokenmill serve`")
    model_server.set_defaults(func=_cmd_model_server)
    return parser


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        import json

        entry = {"timestamp": self.formatTime(record), "level": record.levelname, "target": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _setup_logging(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(_JsonFormatter() if as_json else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra_args", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra_args = extra
    _setup_logging(args.log_level.upper(), args.json_output)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
