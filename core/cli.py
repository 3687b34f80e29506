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
from tokenmill.errors import TokenmillError, ValidationError
from tokenmill.tgi_launcher import (add_accepted_flags, add_refused_flags, listen_address, quantize_method, refusals,
                                    switch)

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

    print_report(load_registry(), args.backend, args.json, args.model_id)
    return 0


def _cmd_conformance(args: argparse.Namespace) -> int:
    from tokenmill.conformance.runner import run_conformance

    return run_conformance(args.backend or "", [a for a in args.extra_args if a != "--"], interpret=args.interpret)


def _env(name: str, default=None):
    return os.environ.get(name, default)


ENGINE_FLAGS = ("--model-id", "--dtype", "--quantize", "--kv-cache-bytes", "--max-batch-prefill-tokens",
                "--max-batch-size", "--max-total-tokens", "--max-batch-total-tokens", "--cache-dir",
                "--cuda-memory-fraction", "--cuda-graphs", "--load-format", "--num-shard", "--sharded",
                "--master-addr", "--master-port", "--node-rank", "--local-shards", "--cpu-bind",
                "--rendezvous-timeout", "--revision", "--huggingface-hub-cache", "--otlp-service-name",
                "--lora-adapters", "--speculate", "--kv-cache-dtype", "--step-target-ms")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Under the 150 ms inter-token p99 `make bench` holds goodput to, with room for a step's own noise.
DEFAULT_STEP_TARGET_MS = 100.0


def fraction(text: str) -> float:
    """A share of device memory: a number in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {text}")
    return value


def open_fraction(text: str) -> float:
    """A share strictly between 0 and 1 (the watermark's gamma)."""
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1), got {text}")
    return value


def non_negative(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
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


def cpu_sets(text: str) -> tuple[tuple[int, ...], ...]:
    """`--cpu-bind`: one core list per local rank, separated by '|'; a list is cores and ranges, e.g. 0-3,8."""
    sets = []
    try:
        for part in text.split("|"):
            cores: set[int] = set()
            for item in part.split(","):
                first, _, last = item.strip().partition("-")
                low, high = int(first), int(last or first)
                if low < 0 or high < low:
                    raise ValueError(item)
                cores.update(range(low, high + 1))
            sets.append(tuple(sorted(cores)))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected one core list per local rank separated by '|', such as 0-15|16-31 or 0,2|1,3; got {text!r}")
    return tuple(sets)


def dtype_name(text: str) -> str:
    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"choose {', '.join(DTYPES)}, got {text!r}")
    return text


def kv_cache_dtype(text: str) -> str:
    from tokenmill.errors import ValidationError
    from tokenmill.kv_cache_dtype import parse_kv_cache_dtype

    try:
        return parse_kv_cache_dtype(text)
    except ValidationError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def tool_call_parser(text: str) -> str:
    from tokenmill.api.tool_parsers import PARSERS

    if text not in PARSERS:
        raise argparse.ArgumentTypeError(f"choose {', '.join(PARSERS)}, got {text!r}")
    return text


def routing_mode(text: str) -> str:
    from tokenmill.api.routing import ROUTING_MODES

    if text not in ROUTING_MODES:
        raise argparse.ArgumentTypeError(f"choose {', '.join(ROUTING_MODES)}, got {text!r}")
    return text


def _num_shard(args: argparse.Namespace) -> int:
    """TGI's pair: --num-shard wins; --sharded true alone means one rank per device the backend found."""
    if args.num_shard is not None:
        if args.sharded is False and args.num_shard > 1:
            raise ValidationError(f"--sharded false contradicts --num-shard {args.num_shard}")
        return args.num_shard
    if not args.sharded:
        return 1
    from tokenmill.backend import resolve_backend

    _, selection = resolve_backend(args.backend)
    devices = len(selection.report.discovery.devices)
    if devices < 2:
        raise ValidationError(f"--sharded true needs at least 2 devices; backend {selection.name!r} has {devices}. "
                              "Give the number of ranks with --num-shard (on the CPU, ranks share the machine's "
                              "cores: see --cpu-bind)")
    return devices


def _shard_fields(args: argparse.Namespace) -> dict:
    num_shard = _num_shard(args)
    local = args.local_shards or num_shard
    if num_shard % local:
        raise ValidationError(f"--local-shards {local} must divide --num-shard {num_shard}: every machine runs as "
                              "many ranks")
    if not 0 <= args.node_rank < num_shard // local:
        raise ValidationError(f"--node-rank must be in 0..{num_shard // local - 1} for {num_shard} ranks, "
                              f"{local} a machine; got {args.node_rank}")
    if args.cpu_bind and len(args.cpu_bind) != local:
        raise ValidationError(f"--cpu-bind gives {len(args.cpu_bind)} core lists for {local} ranks on this machine; "
                              "give one per rank, separated by '|'")
    return dict(num_shard=num_shard, local_shards=local if local != num_shard else None, node_rank=args.node_rank,
                rank=args.node_rank * local, master_addr=args.master_addr, master_port=args.master_port,
                rendezvous_timeout_s=args.rendezvous_timeout, cpu_bind=args.cpu_bind or ())


def load_format(text: str) -> str:
    from tokenmill.loader import LOAD_FORMATS

    if text not in LOAD_FORMATS:
        raise argparse.ArgumentTypeError(f"choose {' or '.join(LOAD_FORMATS)}, got {text!r}")
    return text


def _engine_config(args: argparse.Namespace) -> "EngineConfig":
    from pathlib import Path

    from tokenmill.config import EngineConfig

    return EngineConfig(
        model_id=args.model_id, dtype=args.dtype, backend=args.backend, kv_cache_bytes=args.kv_cache_bytes,
        kv_cache_dtype=args.kv_cache_dtype,
        max_num_batched_tokens=args.max_batch_prefill_tokens, max_num_seqs=args.max_batch_size,
        step_target_s=args.step_target_ms / 1000 if args.step_target_ms else None,
        max_model_len=args.max_total_tokens, enable_prefix_caching=args.prefix_caching, quantize=args.quantize,
        cache_dir=Path(args.cache_dir).expanduser(), max_batch_total_tokens=args.max_batch_total_tokens,
        memory_fraction=args.cuda_memory_fraction, graph_batch_sizes=args.cuda_graphs, load_format=args.load_format,
        lora_adapters=_lora_adapters(args), speculate=args.speculate, **_shard_fields(args),
    )


def _lora_adapters(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    """(name, folder or hub id) of every adapter given by TGI's --lora-adapters and vLLM's --lora-modules."""
    from tokenmill.lora import parse_lora_adapters, parse_lora_modules

    return parse_lora_adapters(args.lora_adapters or "") + parse_lora_modules(args.lora_modules)


def _model_server_args(args: argparse.Namespace) -> tuple[str, ...]:
    """The engine flags this command was given, passed on to the model server it launches."""
    forwarded = []
    for flag in ENGINE_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if isinstance(value, tuple) and value and isinstance(value[0], tuple):
            value = "|".join(",".join(map(str, cores)) for cores in value)
        elif isinstance(value, tuple):
            value = ",".join(map(str, value)) or "0"
        elif isinstance(value, bool):
            value = str(value).lower()
        if value is not None:
            forwarded += [flag, str(value)]
    if args.backend:
        forwarded += ["--backend", args.backend]
    if not args.prefix_caching:
        forwarded.append("--no-prefix-caching")
    if args.lora_modules:
        forwarded += ["--lora-modules", *args.lora_modules]
    return tuple(forwarded)


def _run_other_node(config: "EngineConfig") -> int:
    """A machine without rank 0 serves nothing: it runs its ranks until rank 0 stops them."""
    from tokenmill.shard import run_node

    return run_node(config)


def _hub_options(args: argparse.Namespace) -> "HubOptions":
    from pathlib import Path

    from tokenmill.loader import HubOptions

    cache = args.huggingface_hub_cache
    # HF_HUB_OFFLINE as huggingface_hub reads it; the token as TGI reads it (HF_API_TOKEN is its older name).
    offline = (_env("HF_HUB_OFFLINE") or "").upper() in ("1", "ON", "YES", "TRUE")
    token = _env("HF_TOKEN") or _env("HUGGING_FACE_HUB_TOKEN") or _env("HF_API_TOKEN")
    return HubOptions(revision=args.revision, offline=offline, token=token, endpoint=_env("HF_ENDPOINT"),
                      cache_dir=Path(cache).expanduser() if cache else None)


def _fetch_hub_model(args: argparse.Namespace, config: "EngineConfig") -> "EngineConfig":
    """TGI's download step: a hub --model-id is downloaded (or found in the cache) before anything loads it.
    The engine then loads the snapshot folder; `args.revision` becomes its commit, for the processes started
    with these flags to load that very commit."""
    import dataclasses

    from tokenmill.loader import fetch, is_hub_id

    if args.load_format == "dummy" or not is_hub_id(args.model_id):
        return config
    folder = fetch(args.model_id, _hub_options(args))
    args.revision = folder.name
    return dataclasses.replace(config, model_id=str(folder))


def _launch_args(args: argparse.Namespace) -> tuple[str, ...]:
    """The command line of the model servers this command starts (locally or as Ray replicas)."""
    return _model_server_args(args) + (("--otlp-endpoint", args.otlp_endpoint) if args.otlp_endpoint else ())


def _cmd_serve(args: argparse.Namespace) -> int:
    if args.env:
        from tokenmill.env_report import print_report
        from tokenmill.registry import load_registry

        print_report(load_registry(), args.backend, False, args.model_id or "")
    if args.hostname == "0.0.0.0" and listen_address(_env("HOSTNAME")) != (_env("HOSTNAME") or "0.0.0.0"):
        logger.info("HOSTNAME=%s is no IP address (Docker and shells set it to the machine's name): listening on "
                    "0.0.0.0, as TGI does", _env("HOSTNAME"))
    servers = tuple(args.model_server) or tuple(a for a in (_env("MODEL_SERVERS") or "").split(",") if a)
    if servers and args.ray:
        print("tokenmill serve: --ray starts its own model servers; it cannot front --model-server ones too",
              file=sys.stderr)
        return 2
    launched = None
    local = not args.model_id or os.path.exists(os.path.expanduser(args.model_id))  # nothing to fetch first
    if not servers and not args.ray and args.node_rank == 0 and local:
        # The model server needs nothing computed below: started first, its start-up overlaps this process's
        # imports (FastAPI, gRPC, the tokenizer's transformers: about a second) instead of following them.
        from tokenmill.api.launch import start_model_server

        launched = start_model_server(_launch_args(args))
    try:
        config = _engine_config(args)
        # The router keeps the hub id (the model's public name); the tokenizer read under that id is the
        # snapshot fetched here. Fronting running model servers, it fetches nothing. On Ray it fetches as
        # well: the replicas report the snapshot's path for the tokenizer, and load the commit fetched here.
        loaded = _fetch_hub_model(args, config) if not servers or config.node_rank > 0 else config
        ray_options = _ray_options(args, config) if args.ray else {}
    except (TokenmillError, ValueError) as exc:
        print(f"tokenmill serve: {exc}", file=sys.stderr)
        if launched is not None:
            launched[1].terminate()
        return 2
    if config.node_rank > 0:
        return _run_other_node(loaded)
    model_server_args = _launch_args(args)  # after the fetch: a hub model's flags name the commit fetched
    if not servers and not args.ray and launched is None:
        from tokenmill.api.launch import start_model_server

        launched = start_model_server(model_server_args)

    from tokenmill.api.images import ImageLimits
    from tokenmill.api.routing import RoutingPolicy
    from tokenmill.api.server import ModelServerExited, ServeOptions, serve
    from tokenmill.api.tracing import setup_tracing

    setup_tracing(args.otlp_endpoint, args.otlp_service_name or "tokenmill.router")
    options = ServeOptions(
        engine=config, hostname=args.hostname, port=args.port, grpc_port=args.grpc_port or None,
        max_input_tokens=args.max_input_tokens, max_total_tokens=args.max_total_tokens,
        max_concurrent_requests=args.max_concurrent_requests, max_best_of=args.max_best_of,
        max_stop_sequences=args.max_stop_sequences, max_top_n_tokens=args.max_top_n_tokens,
        max_client_batch_size=args.max_client_batch_size, payload_limit=args.payload_limit, api_key=args.api_key,
        cors_allow_origin=tuple(args.cors_allow_origin), model_servers=servers,
        model_server_args=model_server_args, graceful_shutdown_s=args.graceful_termination_timeout,
        watermark_gamma=args.watermark_gamma, watermark_delta=args.watermark_delta,
        disable_grammar_support=args.disable_grammar_support, tool_call_parser=args.tool_call_parser,
        routing=RoutingPolicy(args.routing, args.routing_max_imbalance), **ray_options,
        image_limits=ImageLimits(not args.disable_image_urls, args.image_fetch_timeout, args.max_image_bytes),
    )
    try:
        serve(options, launched)
    except ModelServerExited as exc:
        print(f"tokenmill serve: {exc}", file=sys.stderr)
        return 1
    return 0


def model_server_setup(argv: list[str]) -> tuple["EngineConfig", str, float]:
    """What `tokenmill model-server ARGV` serves: its engine config (a hub model fetched first), the model id
    it reports, and its grace period. A Ray replica (`tokenmill.api.ray_replicas`) runs the command this way."""
    args = parse_args(["model-server", *argv])
    return _fetch_hub_model(args, _engine_config(args)), args.model_id or "", args.graceful_termination_timeout


def _ray_options(args: argparse.Namespace, config: "EngineConfig") -> dict:
    """ServeOptions' Ray fields: the cluster, the scaling policy, and what each replica asks Ray for."""
    import json

    from tokenmill.api.autoscale import ScalingPolicy

    try:
        from tokenmill.api.ray_replicas import replica_resources
    except Exception as exc:  # not only ImportError: amdsmi without ROCm's library makes `import ray` raise KeyError
        raise ValueError(f"--ray needs Ray, which cannot be imported here ({type(exc).__name__}: {exc}); install it "
                         "with: pip install 'tokenmill[ray]'") from exc
    policy = ScalingPolicy(args.min_replicas, args.min_replicas if args.max_replicas is None else args.max_replicas,
                           args.scale_up_queue, args.scale_down_delay)
    if args.ray_replica_resources:
        try:
            resources = json.loads(args.ray_replica_resources)
        except json.JSONDecodeError:
            resources = None
        if not isinstance(resources, dict) or not all(isinstance(v, (int, float)) for v in resources.values()):
            raise ValueError(f'--ray-replica-resources must be a JSON object of amounts, e.g. {{"GPU": 1}}; got '
                             f"{args.ray_replica_resources!r}")
    else:
        resources = replica_resources(args.backend, config.local_shards or config.num_shard)
    return dict(ray_address=args.ray, scaling=policy, ray_resources=resources)


def _cmd_model_server(args: argparse.Namespace) -> int:
    import asyncio

    from tokenmill.api.grpc.model_server import run_model_server
    from tokenmill.api.tracing import setup_tracing

    from tokenmill.shard import ShardFailure

    try:
        config = _fetch_hub_model(args, _engine_config(args))  # served under --model-id, loaded from its snapshot
    except TokenmillError as exc:
        print(f"tokenmill model-server: {exc}", file=sys.stderr)
        return 2
    if config.node_rank > 0:
        return _run_other_node(config)
    setup_tracing(args.otlp_endpoint, args.otlp_service_name or "tokenmill.model_server")
    try:
        asyncio.run(run_model_server(config, args.listen, args.model_id or "",
                                     grace_s=args.graceful_termination_timeout, parent_pid=args.parent_pid))
    except ShardFailure as exc:
        print(f"tokenmill model-server: {exc}", file=sys.stderr, flush=True)
        # The engine thread may be blocked in a collective with a dead rank, which no interpreter
        # shutdown would interrupt; the other ranks are already killed.
        os._exit(3)
    except TokenmillError as exc:
        print(f"tokenmill model-server: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_shard_worker(args: argparse.Namespace) -> int:
    import dataclasses

    from tokenmill.shard import config_from_json, run_rank

    return run_rank(dataclasses.replace(config_from_json(args.engine_config), rank=args.rank), args.parent_pid)


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
    flag("--model-id", "MODEL_ID", None,
         help="local folder, .gguf file or hub id org/name, downloaded at start (default: embedded SmolLM2)")
    flag("--revision", "REVISION", None, help="branch, tag or commit of a hub --model-id (default: its main branch)")
    flag("--huggingface-hub-cache", "HUGGINGFACE_HUB_CACHE", None,
         help="the Hugging Face cache hub models are downloaded to and read from (default: huggingface_hub's, "
              "HF_HUB_CACHE or $HF_HOME/hub); HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE=1 are honoured too")
    flag("--dtype", "DTYPE", "auto", dtype_name, help="auto, float32, bfloat16 or float16")
    flag("--quantize", "QUANTIZE", None, quantize_method,
         help="quantize the weights as they load, by a method the backend offers (cpu: int8, and "
              "int8-activations: a GGUF's Q4_1/Q8_0 blocks against int8 activations, llama.cpp's arithmetic; "
              "GPUs: int8, int4, fp8); TGI's eetq is int8; gptq, awq, compressed-tensors (or fp8) may name a "
              "pre-quantized checkpoint's own format, which is read without the flag; bitsandbytes, marlin and exl2 are refused")
    flag("--max-total-tokens", "MAX_TOTAL_TOKENS", None, int, help="longest prompt + generation")
    flag("--max-batch-prefill-tokens", "MAX_BATCH_PREFILL_TOKENS", 2048, int, help="tokens per engine step")
    flag("--max-batch-size", "MAX_BATCH_SIZE", 128, int, help="sequences per engine step")
    flag("--step-target-ms", "STEP_TARGET_MS", DEFAULT_STEP_TARGET_MS, non_negative,
         help="wall time an engine step should take while sequences are decoding: prompt chunks beside running "
              "decodes are cut to fit, learnt from the steps so far, so streams do not stall behind a long prefill "
              "(where the decodes alone take over half of it, prompts get as long as they do; at least 64 prompt "
              "tokens a step; a prompt that has waited ten targets gets the whole budget); 0: off, prompts take "
              "--max-batch-prefill-tokens")
    flag("--kv-cache-bytes", "KV_CACHE_BYTES", None, int, help="KV-cache size (default: the backend's budget)")
    flag("--kv-cache-dtype", "KV_CACHE_DTYPE", "auto", kv_cache_dtype,
         help="what the KV cache stores keys and values as: auto (the model's dtype), bfloat16, fp8_e4m3 (fp8), "
              "fp8_e5m2 or int8, one byte an element with a scale per token and kv head: about twice the "
              "sequences in the same memory; a backend that cannot store it refuses at start, naming what it can")
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
              "config.json, or a built-in shape: llama-3-8b, llama-3.2-1b), for benchmarks; no weight file is read")
    flag("--otlp-endpoint", "OTLP_ENDPOINT", None, help="export OpenTelemetry spans over OTLP/gRPC")
    flag("--otlp-service-name", "OTLP_SERVICE_NAME", None,
         help="the spans' service.name, router and model server alike (default: tokenmill.router and "
              "tokenmill.model_server)")
    flag("--graceful-termination-timeout", "GRACEFUL_TERMINATION_TIMEOUT", 30, int,
         help="seconds in-flight requests get to finish on SIGTERM")
    flag("--lora-adapters", "LORA_ADAPTERS", None,
         help="LoRA adapters served beside the model, comma-separated name=folder (a bare folder or cached hub id "
              "is named by itself), in PEFT's format (adapter_config.json + adapter_model.safetensors); a request "
              "picks one by name with `adapter_id` (TGI) or `model` (OpenAI), and any mix shares a batch")
    flag("--speculate", "SPECULATE", 0, count, aliases=("--num-speculative-tokens",),
         help="speculative decoding: up to N draft tokens per decoding sequence and step, found by n-gram prompt "
              "lookup and verified in the same forward; greedy output is unchanged, copy-heavy answers take fewer "
              "steps (vLLM's --num-speculative-tokens is the same); 0: off")
    parser.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=FOLDER",
                        help="vLLM's form of --lora-adapters: name=folder items, or JSON {\"name\": ..., "
                             "\"path\": ...}; both flags may be given")
    _add_shard_flags(parser)
    prefix = _env("PREFIX_CACHING", "1") not in ("0", "false", "False")
    parser.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false", default=prefix,
                        help="disable automatic prefix caching [env: PREFIX_CACHING=0]")


SHARDING_HELP = """\
tensor parallelism: one process per rank. The model server is rank 0 (it alone schedules, samples and
serves) and starts ranks 1..local-shards-1 as child processes; each step it sends its inputs to every
rank, which run the same forward. With several machines, run the same command on each with its
--node-rank and the same --master-addr/--master-port: machine k hosts ranks k*local-shards onwards, and
only machine 0 serves HTTP/gRPC. If any rank dies, rank 0 fails every in-flight request with an error
naming the rank, reports unhealthy, kills the other ranks and exits non-zero (so does `tokenmill
serve`), for the orchestrator to restart the whole group: a group missing a rank cannot run a step."""


def _add_shard_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sharding", SHARDING_HELP)
    flag = _flag_adder(group)
    flag("--num-shard", "NUM_SHARD", None, positive, help="tensor-parallel ranks, the world size (default 1)")
    flag("--sharded", "SHARDED", None, boolean,
         help="true without --num-shard: one rank per device the backend discovered (at least 2; the CPU "
              "backend counts one device, so give --num-shard there); false: refuse --num-shard above 1")
    flag("--master-addr", "MASTER_ADDR", "127.0.0.1", help="address of rank 0's rendezvous (torch.distributed)")
    flag("--master-port", "MASTER_PORT", 29500, int, help="port of rank 0's rendezvous")
    flag("--node-rank", "NODE_RANK", 0, int, help="this machine's index; machine 0 holds rank 0 and serves")
    flag("--local-shards", "LOCAL_SHARDS", None, positive, help="ranks on each machine (default: --num-shard)")
    flag("--cpu-bind", "CPU_BIND", None, cpu_sets,
         help="the cores of each local rank, '|'-separated, e.g. 0-15|16-31; each rank pins itself to its "
              "list and runs one torch thread per core")
    flag("--rendezvous-timeout", "RENDEZVOUS_TIMEOUT", 120.0, float,
         help="seconds every rank has to join rank 0; then start-up fails naming the missing ranks")


RAY_HELP = """\
scale-out on Ray: each model server is a Ray actor, placed on a node with the backend's device, behind this
router; the set grows under a queue and shrinks after a quiet period, between --min-replicas and
--max-replicas. Every node runs the same tokenmill install."""


def _add_serve_flags(serve: argparse.ArgumentParser) -> None:
    """The router's flags, named as TGI's launcher names them, each with TGI's environment variable."""
    _add_engine_flags(serve)
    flag = _flag_adder(serve)
    serve.add_argument("--hostname", default=listen_address(_env("HOSTNAME")),
                       help="address to listen on (default 0.0.0.0) [env: HOSTNAME, when it is an IP address: "
                            "Docker and shells set it to the machine's name, which TGI ignores too]")
    flag("--port", "PORT", 3000, int, aliases=("-p",), help="HTTP port")
    flag("--grpc-port", "GRPC_PORT", 3001, int, help="public gRPC port (0: no gRPC server)")
    flag("--max-input-tokens", "MAX_INPUT_TOKENS", None, int, help="longest prompt")
    flag("--max-input-length", "MAX_INPUT_LENGTH", None, int, help="TGI's legacy name of --max-input-tokens")
    flag("--max-concurrent-requests", "MAX_CONCURRENT_REQUESTS", 128, int, help="beyond this, 429")
    flag("--max-best-of", "MAX_BEST_OF", 2, int, help="largest best_of")
    flag("--max-stop-sequences", "MAX_STOP_SEQUENCES", 4, int, help="most stop sequences per request")
    flag("--max-top-n-tokens", "MAX_TOP_N_TOKENS", 5, int, help="largest top_n_tokens")
    flag("--max-client-batch-size", "MAX_CLIENT_BATCH_SIZE", 4, int, help="most prompts per /v1/completions")
    flag("--payload-limit", "PAYLOAD_LIMIT", 2_000_000, int, help="largest request body in bytes")
    flag("--api-key", "API_KEY", None, help="require 'Authorization: Bearer KEY' on generation routes")
    flag("--watermark-gamma", "WATERMARK_GAMMA", 0.5, open_fraction,
         help="the share of the vocabulary on each green list of requests with `watermark` (TGI's)")
    flag("--watermark-delta", "WATERMARK_DELTA", 2.0, non_negative,
         help="what a green token's logit gains in requests with `watermark` (TGI's)")
    flag("--tool-call-parser", "TOOL_CALL_PARSER", "hermes", tool_call_parser,
         help="how `tool_choice: auto` finds tool calls in the model's text (vLLM's flag): hermes "
              "(<tool_call>{...}</tool_call>: Qwen2.5/3, Hermes, SmolLM3), llama3_json (a bare JSON call: Llama 3.1+) "
              "or mistral ([TOOL_CALLS][...])")
    serve.add_argument("--enable-auto-tool-choice", action="store_true",
                       help="accepted for vLLM compatibility: tool_choice auto is always served")
    add_accepted_flags(serve, flag, os.environ)
    serve.add_argument("--cors-allow-origin", action="append", default=None,
                       help="allowed CORS origin (repeatable) [env: CORS_ALLOW_ORIGIN, comma-separated]")
    serve.add_argument("--model-server", action="append", default=[],
                       help="front this running model server instead of launching one (repeatable) "
                            "[env: MODEL_SERVERS, comma-separated]")
    serve.add_argument("--disable-image-urls", action="store_true", default=switch(os.environ, "DISABLE_IMAGE_URLS"),
                       help="a vision-language model reads images from data URLs only: http(s) image URLs get 422 "
                            "(the server fetches nothing on a client's behalf) [env: DISABLE_IMAGE_URLS]")
    flag("--image-fetch-timeout", "IMAGE_FETCH_TIMEOUT", 10.0, positive_float,
         help="seconds an http(s) image URL has to answer in full")
    flag("--max-image-bytes", "MAX_IMAGE_BYTES", 10_000_000, positive,
         help="largest image file a request may send or name (data URLs are also bound by --payload-limit)")
    ray = serve.add_argument_group("Ray", RAY_HELP)
    ray_flag = _flag_adder(ray)
    ray_flag("--ray", "TOKENMILL_RAY_ADDRESS", None,
             help="run the model servers as actors on the Ray cluster at this address (e.g. 10.0.0.1:6379, or "
                  "auto), behind this router")
    ray_flag("--min-replicas", "MIN_REPLICAS", 1, positive, help="Ray: model servers kept running")
    ray_flag("--max-replicas", "MAX_REPLICAS", None, positive,
             help="Ray: most model servers the autoscaler runs (default: --min-replicas, no autoscaling)")
    ray_flag("--scale-up-queue", "SCALE_UP_QUEUE", 1, positive,
             help="Ray: requests queued in the model servers, per serving one, that start another")
    ray_flag("--scale-down-delay", "SCALE_DOWN_DELAY", 60.0, non_negative,
             help="Ray: seconds of empty queues after which one model server is drained and stopped")
    ray_flag("--ray-replica-resources", "RAY_REPLICA_RESOURCES", None,
             help='Ray: the resources each model server asks for, as JSON (e.g. {"GPU": 1, "a100": 1}); default: '
                  "the backend's answer ({\"GPU\": 1} on GPUs, {\"CPU\": 1} on the CPU)")
    flag("--routing", "ROUTING", "prefix", routing_mode,
         help="how a request's model server is picked among several: prefix (the one that served its prompt's "
              "prefix, whose prefix cache may hold it, unless overloaded; else least-loaded) or least-loaded")
    flag("--routing-max-imbalance", "ROUTING_MAX_IMBALANCE", 4, count,
         help="prefix routing: requests in flight a prefix's model server may have beyond the least-loaded one "
              "before the request goes to the least-loaded one instead")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description="LLM inference server with pluggable hardware backends")
    parser.add_argument("--version", action="version", version=f"tokenmill {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"),
                        help="logging level [env: LOG_LEVEL]")
    parser.add_argument("--json-output", action="store_true", default=switch(os.environ, "JSON_OUTPUT"),
                        help="log one JSON object per line [env: JSON_OUTPUT]")
    # shard-worker is started by the model server, never by hand: left out of the listed commands.
    commands = parser.add_subparsers(dest="command", required=True, metavar="{env,conformance,serve,model-server}")

    env = commands.add_parser("env", help="list the backend plugins, their devices and which one would be chosen")
    _add_backend_flag(env)
    env.add_argument("--json", action="store_true", help="print the report as JSON")
    env.add_argument("--model-id", default=None,
                     help="also say whose code would run this model (a folder, GGUF file or cached hub id): "
                          "tokenmill's own implementation or the transformers fallback")
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
    add_refused_flags(serve)
    serve.set_defaults(func=_cmd_serve)

    model_server = commands.add_parser("model-server", help="serve one engine replica over the internal gRPC protocol")
    _add_backend_flag(model_server)
    _add_engine_flags(model_server)
    _flag_adder(model_server)("--listen", "MODEL_SERVER_LISTEN", "unix:///tmp/tokenmill-model-server.sock",
                              help="unix:///path or host:port")
    model_server.add_argument("--parent-pid", type=int, default=None,
                              help="stop when this process (the launcher) is gone; set by `tokenmill serve`")
    model_server.set_defaults(func=_cmd_model_server)

    worker = commands.add_parser("shard-worker")
    worker.add_argument("--rank", type=int, required=True)
    worker.add_argument("--parent-pid", type=int, default=None, help="die with this process (rank 0's)")
    worker.add_argument("--engine-config", required=True, help="the rank's EngineConfig as JSON")
    worker.set_defaults(func=_cmd_shard_worker)
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
    if logging.getLogger().level > logging.DEBUG:  # one line per HTTP request: a hub download makes dozens
        for client in ("httpx", "httpx2"):
            logging.getLogger(client).setLevel(logging.WARNING)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line and the environment, as the commands read them."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra_args", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra_args = extra
    if args.command == "serve":
        # Given flags replace the variable's list, as in TGI.
        args.cors_allow_origin = args.cors_allow_origin or [o for o in (_env("CORS_ALLOW_ORIGIN") or "").split(",")
                                                            if o.strip()]
        if args.max_input_length is not None:
            if args.max_input_tokens not in (None, args.max_input_length):
                parser.error(f"--max-input-length {args.max_input_length} (TGI's legacy name of --max-input-tokens) "
                             f"contradicts --max-input-tokens {args.max_input_tokens}")
            args.max_input_tokens = args.max_input_length
    return args


def _implemented_options() -> set[str]:
    """The option strings `tokenmill serve` implements (the refused ones are registered apart)."""
    serve = argparse.ArgumentParser(add_help=False)
    _add_backend_flag(serve)
    _add_serve_flags(serve)
    return set(serve._option_string_actions)  # noqa: SLF001 - argparse offers no public view of its options


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _setup_logging(args.log_level.upper(), args.json_output)
    # A model server started by `tokenmill serve` inherits the environment the launcher checked already.
    if args.command == "serve" or (args.command == "model-server" and args.parent_pid is None):
        refused = refusals(args, os.environ, _implemented_options())
        for message in refused:
            print(f"tokenmill {args.command}: {message}", file=sys.stderr)
        if refused:
            return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
