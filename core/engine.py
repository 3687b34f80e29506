"""The engine: schedule -> run the model -> sample -> update -> report, one step at a time.

`Engine` is synchronous and single-threaded. `AsyncEngine` (in `async_engine.py`) runs it on a
thread for the serving layer; the conformance suite and benchmarks use `Engine.generate`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from tokenmill.backend import Backend, resolve_backend
from tokenmill.block_manager import BlockManager
from tokenmill.config import EngineConfig
from tokenmill.detokenizer import IncrementalDetokenizer, StopChecker
from tokenmill.errors import ValidationError
from tokenmill.grammar import GrammarCompiler, GrammarError
from tokenmill.grammar.matcher import GrammarMatcher, fill_bitmask
from tokenmill.interfaces import LayerOps, MemoryRequest, SlotModel
from tokenmill.kv_cache_dtype import AUTO, parse_kv_cache_dtype, resolve_kv_cache_dtype
from tokenmill.layers.moe import experts_of, prepare_experts
from tokenmill.layers.rotary import context_length, longrope_switch_length, rope_depends_on_length
from tokenmill.loader import Checkpoint, build_dummy_model, load_checkpoint, parse_dtype, single_file_checkpoint
from tokenmill.loader.quantized_checkpoints import CHECKPOINT_FORMATS, quantized_to
from tokenmill.lora.adapters import LoRAAdapters, load_adapters
from tokenmill.model_runner import ModelRunner, SequenceStep, StepPadding, StepShape, host_to_device
from tokenmill.models import get_model_class, kv_cache_shape, model_implementation, text_config_of
from tokenmill.multimodal import ImageInput
from tokenmill.multimodal.encoder import ImageEncoder, RequestImages
from tokenmill.outputs import RequestOutput, StepStats, TokenInfo
from tokenmill.parallel import SINGLE_RANK, ParallelContext
from tokenmill.request import FinishReason, Request
from tokenmill.sampler import Sampler, SamplingMetadata
from tokenmill.sampling_params import SamplingParams
from tokenmill.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from tokenmill.slots import PREFIX_CACHING_UNAVAILABLE, SlotAllocator, SlotRunner
from tokenmill.speculate import NgramSpeculator, SpeculationStats, Verification
from tokenmill.weight_cache import PreparedWeights, cacheable

PREFIX_CACHING_LENGTH_DEPENDENT_ROPE = "disabled (the model's RoPE scaling depends on each prompt's length)"

logger = logging.getLogger(__name__)


@dataclass
class _RequestState:
    """Engine-side bookkeeping for one request beyond what the scheduler tracks."""

    request: Request
    detokenizer: IncrementalDetokenizer
    stop: StopChecker
    arrival_time: float
    prompt_logprobs: list[TokenInfo] | None = None
    cumulative_logprob: float = 0.0
    first_output_sent: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    matcher: GrammarMatcher | None = None  # where the request is in its grammar (structured output)
    images: RequestImages | None = None  # the prompt's images, for a vision-language model


class Engine:
    def __init__(self, config: EngineConfig, backend: Backend | None = None, checkpoint: Checkpoint | None = None,
                 parallel: ParallelContext | None = None):
        self.config = config
        self.parallel = parallel or SINGLE_RANK  # this rank's place in a tensor-parallel group
        self.backend = backend or resolve_backend(config.backend)[0]
        self.platform = self.backend.init_device(config.local_rank)
        self.device = self.platform.device
        self.dtype = parse_dtype(config.dtype, self.platform.preferred_dtype)
        if self.dtype not in self.platform.supported_dtypes:
            raise ValidationError(f"backend {self.backend.name!r} does not support {self.dtype}")
        start = time.perf_counter()
        # Where the prepared weights are cached from an earlier start, the checkpoint's tensors are not read.
        self.prepared_weights = None if checkpoint is not None else self._prepared_weights_entry(config)
        self._restoring = self.prepared_weights is not None and self.prepared_weights.exists()
        self.checkpoint = checkpoint or load_checkpoint(config.model_id, self.dtype, progress=config.progress,
                                                        cache_dir=config.cache_dir, load_format=config.load_format,
                                                        weights=not self._restoring)
        self.load_time_s = time.perf_counter() - start
        self.tokenizer = self.checkpoint.tokenizer
        model_config = self.checkpoint.config
        self.model_config = model_config
        self.text_config = text_config_of(model_config)  # the language model's (a vision-language config's text_config)
        self.max_model_len = config.max_model_len or context_length(self.text_config)

        self.lora: LoRAAdapters | None = None  # the LoRA adapters, when `lora_adapters` names some
        self.image_encoder: ImageEncoder | None = None  # a vision-language model's, with its image processor
        executor = self.backend.model_executor(
            model_id=config.model_id or self.checkpoint.source, config=model_config, checkpoint=self.checkpoint, dtype=self.dtype,
            device=self.device, max_num_seqs=config.max_num_seqs, max_model_len=self.max_model_len)
        if executor is None:
            buckets = self._build_paged_model(config)
            scheduler_config = SchedulerConfig(config.max_num_batched_tokens, config.max_num_seqs)
        else:
            buckets = None  # the model pads to its compiled shapes itself
            scheduler_config = self._use_slot_model(config, executor)
        self.scheduler = Scheduler(scheduler_config, self.block_manager, buckets)
        self.eos_token_ids = set(self.checkpoint.eos_token_ids)
        self.sampler = Sampler(config.seed, self.backend.token_mask())
        if config.speculate < 0:
            raise ValidationError(f"--speculate must be 0 (off) or a number of draft tokens, got {config.speculate}")
        self.speculator = NgramSpeculator(config.speculate, self.max_model_len) if config.speculate else None
        self.longrope_switch = longrope_switch_length(model_config)
        if config.speculate and self.longrope_switch is not None:
            # Draft rows could cross the switch before the sequence is recomputed past it.
            raise ValidationError("--speculate is not supported with longrope RoPE scaling (Phi-3 128k); "
                                  "start without --speculate")
        self.speculation = SpeculationStats()
        # Grammars compile on this pool, off the step loop; a request waits in `_compiling` meanwhile.
        self.grammars = GrammarCompiler.for_tokenizer(self.tokenizer, self.text_config.vocab_size, self.eos_token_ids)
        self._compiling: dict[str, concurrent.futures.Future] = {}
        self._states: dict[str, _RequestState] = {}
        self._arrivals = itertools.count()
        self.num_computed_prompt_tokens = 0  # prompt tokens actually run through the model (prefix hits excluded)
        self.last_step: StepStats | None = None  # what the latest step ran, for the batch metrics

    def _use_slot_model(self, config: EngineConfig, model: Any) -> SchedulerConfig:
        """Run the backend's own model: one slot per running request, no paged cache, no prefix caching."""
        if not isinstance(model, SlotModel):
            raise ValidationError(f"backend {self.backend.name!r}: tokenmill_model_executor returned "
                                  f"{type(model).__name__}, not a tokenmill.interfaces.SlotModel")
        if self.parallel.is_parallel:
            raise ValidationError(f"backend {self.backend.name!r} runs its own model, sharded its own way: "
                                  "run it with one shard")
        if config.lora_adapters:
            raise ValidationError(f"backend {self.backend.name!r} runs its own model, which takes no LoRA adapters: "
                                  "start it without --lora-adapters / --lora-modules")
        if config.speculate:
            # Its slots only grow, one step after another: rejected draft tokens could not be taken back.
            raise ValidationError(f"backend {self.backend.name!r} runs its own model, which cannot verify draft tokens: "
                                  "start it without --speculate")
        if resolve_kv_cache_dtype(parse_kv_cache_dtype(config.kv_cache_dtype), self.dtype) != AUTO:
            raise ValidationError(f"backend {self.backend.name!r} runs its own model, which keeps its own cache in "
                                  f"{str(self.dtype).removeprefix('torch.')}: start it without --kv-cache-dtype")
        if config.enable_prefix_caching:
            logger.warning("prefix caching: %s", PREFIX_CACHING_UNAVAILABLE)
        self.prefix_caching = PREFIX_CACHING_UNAVAILABLE
        self.model_implementation = "backend"  # the backend's own model, not the core's
        self.model = model
        self.max_model_len = min(self.max_model_len, model.max_seq_len)
        self.checkpoint.tensors = {}
        self.checkpoint.ggml_weights = {}
        self.runner = SlotRunner(model)
        self.block_manager = self._new_block_manager()
        return SchedulerConfig(config.max_num_batched_tokens, min(config.max_num_seqs, model.num_slots),
                               model.mixes_prefill_and_decode, model.chunked_prefill)

    def _new_block_manager(self) -> BlockManager:
        if isinstance(self.model, SlotModel):
            return SlotAllocator(self.model)
        return BlockManager(self.num_blocks, self.layout.block_size, self.prefix_caching == "enabled",
                            self.layout.resident_block_limit(self.num_blocks))

    def _build_paged_model(self, config: EngineConfig):
        """The core's model over a paged KV cache of the backend's layout; returns the shape buckets."""
        model_config = self.model_config
        self.prefix_caching = "enabled" if config.enable_prefix_caching else "disabled"
        model_class = get_model_class(model_config)
        self._use_model_implementation(model_implementation(model_class))
        if config.enable_prefix_caching and rope_depends_on_length(self.text_config):
            # A prompt token's key is rotated for its own prompt's length: the same prefix in another
            # prompt has other keys (`tokenmill.layers.rotary`), so blocks cannot be shared.
            self.prefix_caching = PREFIX_CACHING_LENGTH_DEPENDENT_ROPE
            logger.warning("prefix caching: %s", self.prefix_caching)
        checkpoint_method = self._checkpoint_method(config)
        self.layout = self._kv_cache_layout(config)
        self._attention: dict = {}  # one backend object per distinct layer spec, filled as the model is built
        model_class = functools.partial(model_class, parallel=self.parallel)
        method, restored = checkpoint_method or self._linear_method(config), False
        if self.checkpoint.format == "dummy":
            self.model = build_dummy_model(model_class, model_config, self._make_attention, self.dtype, self.device,
                                           config.seed)
        else:
            self.model = model_class(model_config, self._make_attention, self.dtype)
            restored = self._restoring and self.prepared_weights.restore(self.model, method)
            if self._restoring and not restored:  # the entry was unusable: read the checkpoint's weights after all
                loaded = load_checkpoint(config.model_id, self.dtype, progress=config.progress,
                                         cache_dir=config.cache_dir, load_format=config.load_format)
                self.checkpoint.tensors, self.checkpoint.ggml_weights = loaded.tensors, loaded.ggml_weights
            if not restored:
                if self.checkpoint.quantized_weights:  # first: those layers then expect no dense weight
                    self.model.load_quantized_weights({k: quantized_to(v, self.device)
                                                       for k, v in self.checkpoint.quantized_weights.items()})
                self.model.load_weights({k: v.to(self.device) for k, v in self.checkpoint.tensors.items()})
        self.model.to(self.device).eval()
        self.checkpoint.tensors = {}  # the model owns the weights now
        self.checkpoint.quantized_weights = {}
        if not restored:
            self._prepare_linears(method)
            if self.prepared_weights is not None and not experts_of(self.model):
                self.prepared_weights.save(self.model, method)
        self.checkpoint.ggml_weights = {}
        if experts_of(self.model):
            prepare_experts(self.model, self.backend.moe_method(self.dtype))

        self._bind_layer_ops(self.backend.layer_ops(self.dtype))
        if config.lora_adapters:  # before compile_model: a captured step must see the adapted layers
            self.lora = load_adapters(self.model, config.lora_adapters, self.backend.lora_method(self.dtype),
                                      self.dtype, self.device)

        weights_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        budget = self.backend.memory_budget(self.device, MemoryRequest(
            weights_bytes, config.kv_cache_bytes, config.memory_fraction, profile=self._profile_largest_step))
        self.num_blocks = budget // self.layout.bytes_per_block()
        if config.max_batch_total_tokens:
            self.num_blocks = min(self.num_blocks, -(-config.max_batch_total_tokens // self.layout.block_size))
        if self.parallel.is_parallel:  # rank 0 hands out the block ids: every rank's cache must hold them all
            self.num_blocks = int(self.parallel.communicator.all_gather(
                torch.tensor([self.num_blocks], device=self.device), dim=0).min())
        if self.num_blocks < 1:
            raise ValidationError(f"the KV-cache budget ({budget} bytes) holds no block of "
                                  f"{self.layout.bytes_per_block()} bytes; give more memory")
        self.kv_caches = self.layout.allocate(self.num_blocks)
        buckets = self.backend.shape_buckets(config.max_num_batched_tokens, config.max_num_seqs)
        forward = self.backend.compile_model(self.model, buckets, config.graph_batch_sizes)
        padding = None if buckets is None else StepPadding(  # tables up to a width bucket, or the longest context
            buckets, -(-self.max_model_len // self.layout.block_size), self.max_model_len, self.layout.block_size)
        self.runner = ModelRunner(self.model, forward, self.kv_caches, list(self._attention.values()),
                                  self.layout.block_size, self.device, padding, self.platform.sampling_device,
                                  self.platform.inference_mode, self.lora)
        self.block_manager = self._new_block_manager()
        processor = getattr(self.checkpoint, "processor", None)
        if hasattr(self.model, "encode_images") and processor is not None:
            self.image_encoder = ImageEncoder(self.model, processor.image_processor)
        return buckets

    def _use_model_implementation(self, implementation: str) -> None:
        """Say whose code runs the model; refuse what the transformers fallback cannot do."""
        self.model_implementation = implementation
        architecture = (getattr(self.model_config, "architectures", None) or ["?"])[0]
        if implementation == "tokenmill":
            logger.info("model %s: tokenmill's own implementation", architecture)
            return
        logger.info("model %s: no tokenmill implementation, running transformers' modeling code (the transformers "
                    "fallback) with tokenmill's paged attention", architecture)
        config = self.config
        lacking = [flag for flag, asked in (("--quantize", config.quantize), ("--lora-adapters", config.lora_adapters),
                                            ("--load-format dummy", config.load_format == "dummy"),
                                            ("a pre-quantized checkpoint", bool(self.checkpoint.quantized_weights)))
                   if asked]
        if lacking:
            raise ValidationError(f"{architecture} runs on the transformers fallback, which does not take "
                                  f"{', '.join(lacking)}; start it without")

    def _checkpoint_method(self, config: EngineConfig):
        """The backend's method for a pre-quantized checkpoint (None for a dense one), refused before any
        layer is built where the backend runs no method for its format, or where --quantize asks for another."""
        weights = self.checkpoint.quantized_weights
        weight_format = next(iter(weights.values())).format if weights else None
        if not weights:
            if config.quantize in CHECKPOINT_FORMATS and config.quantize not in self.backend.quantization_methods:
                raise ValidationError(f"--quantize {config.quantize} names a pre-quantized checkpoint format, and this "
                                      "checkpoint is not quantized: start it without, or with a method the backend offers")
            return None
        description = self.checkpoint.quantization or "pre-quantized"
        if config.quantize and config.quantize != weight_format:  # TGI's `--quantize gptq` names the format itself
            raise ValidationError(f"the checkpoint is already quantized ({description}): start it without "
                                  f"--quantize {config.quantize}")
        method = self.backend.checkpoint_method(self.dtype, weight_format, description)
        logger.info("pre-quantized checkpoint (%s): %d linear layers run by %s", description, len(weights), method.name)
        return method

    def _kv_cache_layout(self, config: EngineConfig):
        """The backend's layout for the model's cache in `--kv-cache-dtype`; refused if it cannot store that."""
        cache_dtype = resolve_kv_cache_dtype(parse_kv_cache_dtype(config.kv_cache_dtype), self.dtype)
        shape = dataclasses.replace(kv_cache_shape(self.model_config, self.dtype, self.parallel), cache_dtype=cache_dtype)
        layout = self.backend.kv_cache_layout(shape, self.device)
        if cache_dtype not in layout.cache_dtypes:
            stored = ", ".join(name if name != "auto" else f"auto ({str(self.dtype).removeprefix('torch.')})"
                               for name in layout.cache_dtypes)
            raise ValidationError(f"backend {self.backend.name!r} cannot store the KV cache as {config.kv_cache_dtype} "
                                  f"with a {str(self.dtype).removeprefix('torch.')} model; its KV cache dtypes: {stored}")
        return layout

    def _profile_largest_step(self) -> None:
        """`MemoryRequest.profile`: one eager forward of the largest step, on a scratch cache freed on return.

        One sequence of max_num_batched_tokens tokens (capped at what the model's positions and context
        hold) asking for as many logit rows as a full batch of sequences would, so the peak the backend
        measures covers the largest activations and logits a real step makes. The compiled forward
        does not exist yet: graphs are captured later, over the real cache.
        """
        config = self.config
        num_tokens = max(1, min(config.max_num_batched_tokens, self.max_model_len,
                                context_length(self.text_config)))
        num_blocks = -(-num_tokens // self.layout.block_size)
        scratch = self.layout.allocate(num_blocks)
        runner = ModelRunner(self.model, self.model, scratch, list(self._attention.values()), self.layout.block_size,
                             self.device, inference_mode=self.platform.inference_mode)
        runner.execute([SequenceStep([0] * num_tokens, 0, list(range(num_blocks)),
                                     min(num_tokens, config.max_num_seqs))])
        del runner, scratch  # the backend reads its counters once this returns: nothing of the step stays alive

    def _make_attention(self, spec):
        backend = self.backend.attention(spec, self.layout)
        self._attention[spec] = backend
        return backend

    def _linear_method(self, config: EngineConfig):
        """How the linear layers run: `--quantize`'s method, else the backend's dense method (None: F.linear)."""
        if config.quantize:
            return self.backend.quantization_method(config.quantize)
        return self.backend.dense_linear_method(self.dtype)

    def _prepared_weights_entry(self, config: EngineConfig) -> PreparedWeights | None:
        """The cache entry for this model's prepared weights, where there can be one: a cache dir, one
        checkpoint file, a linear method that serializes, a single rank. An entry exists only where the
        core's model ran on this backend before: a backend running its own model never writes one."""
        if config.cache_dir is None or config.load_format == "dummy" or self.parallel.is_parallel:
            return None
        if config.quantize in CHECKPOINT_FORMATS:  # TGI's name of a safetensors checkpoint's own format
            return None
        method = self._linear_method(config)
        source = single_file_checkpoint(config.model_id) if cacheable(method) else None
        return None if source is None else PreparedWeights.locate(config.cache_dir, source, method, self.dtype)

    def _prepare_linears(self, method) -> None:
        from tokenmill.layers.linear import Linear

        if method is None:
            return
        self.model.load_ggml_weights(self.checkpoint.ggml_weights)
        for module in self.model.modules():
            if isinstance(module, Linear):
                module.quantize(method)

    def _bind_layer_ops(self, ops: LayerOps) -> None:
        """Point every module that runs elementwise layer ops (norms, rotary, MLP) at the backend's."""
        for module in self.model.modules():
            if isinstance(getattr(module, "ops", None), LayerOps):
                module.ops = ops

    def warmup(self, progress: bool | None = None) -> None:
        """Run the step shapes the server will see once before serving (every bucketed shape, if declared).

        Compiling backends pay their compilation here; on any backend the first real request no
        longer pays first-call costs. Leaves the cache empty. Call it before any request is added.
        """
        from tqdm import tqdm

        show = self.config.progress if progress is None else progress
        if self.runner.padding is not None:
            shapes = self._reachable_step_shapes()
            for steps in tqdm(shapes.values(), desc="compiling step shapes", unit="shape", disable=not show):
                self.runner.execute(steps)
            logger.info("warmed up %d step shapes", len(shapes))
            return  # the runner alone ran: no block or prefix was handed out, only free blocks were written
        sizes = [min(self.config.max_num_batched_tokens, 64), 1]
        sizes = [n for n in sizes if n <= self.kv_capacity_tokens - 1] or [1]
        for size in tqdm(sizes, desc="warming up", unit="shape", disable=not show):
            self.generate([[0] * size], SamplingParams(max_new_tokens=1, ignore_eos=True))
        self.block_manager = self._new_block_manager()
        self.scheduler.blocks = self.block_manager  # forget the warm-up's dummy prefixes

    def _reachable_step_shapes(self) -> dict[StepShape, list[SequenceStep]]:
        """A step of every padded shape the scheduler can make, keyed by that shape.

        Decodes: a step of m sequences has m tokens, so m alone fixes its token and sequence buckets.
        Prefills: a step of n tokens over m sequences (n > m: one feeds two or more) has the shape of its
        (token, sequence) buckets; a pair is reachable when some n and m in it, within the scheduler's
        limits, have n > m. A prefill asking for more logit rows than its sequence bucket (prompt
        logprobs: n > that bucket) has a wider logits shape, warmed too.

        Widths: a step's widest block table spans from its evenly spread tokens (ceil(n / m) of a fresh
        prompt; for a decode, one) up to the longest context a request can have (the model's, or the
        cache's if smaller), so for each (tokens, sequences, logits) shape the fewest tokens and most
        sequences are tried, and every width bucket from that step's table up: the first sequence's
        tokens are placed at the end of a context of that width, the others start fresh prompts.

        The count is at most (D + 2 P) * W: D (token, sequence) pairs decodes reach (the sequence buckets
        up to max_num_seqs, when the smallest token bucket holds them), P pairs prefills reach (at most
        tokens x sequences buckets), W width buckets (1 without `ShapeBuckets.blocks_per_seq`).
        """
        if self.scheduler.has_unfinished():
            raise RuntimeError("warm-up writes the KV cache's free blocks: run it before adding requests")
        padding, buckets = self.runner.padding, self.runner.padding.buckets
        block_size = self.layout.block_size
        max_tokens, max_seqs = self.scheduler.max_tokens_per_step, self.scheduler.max_seqs_per_step
        longest = min(self.max_model_len, self.kv_capacity_tokens)  # the longest context a request can have
        shapes: dict[StepShape, list[SequenceStep]] = {}
        blocks = itertools.count()

        def widths_from(narrowest: int) -> Iterable[int]:
            """One table width (in blocks) per width bucket a step can reach, from `narrowest` blocks up."""
            floor = 0
            for bucket in padding.widths:
                width = max(floor + 1, narrowest)
                if width <= min(bucket, -(-longest // block_size)):
                    yield width
                floor = bucket

        def add(lengths: list[int], logits: list[int], width: int) -> None:
            starts = [min(width * block_size, longest) - lengths[0]] + [0] * (len(lengths) - 1)
            steps = [SequenceStep([0] * n, start, [next(blocks) % self.num_blocks
                                                   for _ in range(-(-(start + n) // block_size))], k)
                     for n, start, k in zip(lengths, starts, logits)]
            shape = padding.shape_of(sum(lengths), len(lengths), sum(logits), max(lengths) == 1,
                                     max(len(step.block_table) for step in steps))
            shapes.setdefault(shape, steps)

        for m in range(1, min(max_seqs, max_tokens) + 1):
            for width in widths_from(1):
                add([1] * m, [1] * m, width)
        token_floors = [0, *buckets.num_tokens[:-1]]
        seq_floors = [0, *buckets.num_seqs[:-1]]
        for token_floor, t in zip(token_floors, buckets.num_tokens):
            for seq_floor, s in zip(seq_floors, buckets.num_seqs):
                for wide_logits in (False, True):  # wide: every position's logits (prompt logprobs)
                    n = max(token_floor + 1, seq_floor + 2, s + 1 if wide_logits else 0)
                    m = min(s, max_seqs, n - 1)
                    if n > min(t, max_tokens) or m <= seq_floor or n > m * longest:
                        continue
                    lengths = [n // m + (i < n % m) for i in range(m)]
                    for width in widths_from(-(-lengths[0] // block_size)):
                        add(lengths, lengths if wide_logits else [1] * m, width)
        return shapes

    # ---- requests ---------------------------------------------------------------------------------

    @property
    def kv_capacity_tokens(self) -> int:
        return self.block_manager.num_blocks * self.block_manager.block_size

    @property
    def prefix_cache_hit_rate(self) -> float | None:
        """Prompt tokens served from the prefix cache over those looked up; None where there is no prefix cache."""
        if self.prefix_caching != "enabled":
            return None
        blocks = self.block_manager
        return blocks.prefix_hits / blocks.prefix_queries if blocks.prefix_queries else 0.0

    @property
    def num_step_shapes(self) -> int:
        """Distinct padded step shapes the model has run: with shape buckets, one compilation each; else 0."""
        return self.runner.num_step_shapes

    @property
    def num_compiles(self) -> int:
        """Compilations of the model step so far: the backend's own count where it keeps one, else the
        distinct padded step shapes run (0 for a backend without shape buckets)."""
        count = self.platform.compile_count
        return count() if count is not None else self.num_step_shapes

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """The LoRA adapters a request may name, in slot order."""
        return self.lora.names if self.lora is not None else ()

    def add_request(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams,
                    adapter: str | None = None, images: Sequence[ImageInput] = ()) -> None:
        """Queue a request, run with LoRA adapter `adapter` (None: the base model); it joins the running
        batch at the next step, whatever adapters the batch's other requests use. `images`: the prompt's,
        in order, their tokens already in `prompt_token_ids` (`tokenmill.multimodal`)."""
        if adapter is not None and self.lora is None:
            raise ValidationError(f"LoRA adapter {adapter!r} is not loaded; this server has no adapters "
                                  "(start it with --lora-adapters or --lora-modules)")
        slot = self.lora.slot(adapter) if self.lora is not None else 0
        if request_id in self._states:
            raise ValidationError(f"request id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise ValidationError("`inputs` cannot be empty")
        if len(prompt_token_ids) > self.scheduler.max_tokens_per_step and not self.scheduler.config.chunked_prefill:
            raise ValidationError(f"`inputs` must have at most {self.scheduler.max_tokens_per_step} tokens on this "
                                  f"backend, which feeds a prompt whole in one step. Given: {len(prompt_token_ids)}")
        total = len(prompt_token_ids) + params.max_new_tokens
        limit = min(self.max_model_len, self.kv_capacity_tokens)
        if total > limit:
            raise ValidationError(f"`inputs` tokens + `max_new_tokens` must be <= {limit}. Given: "
                                  f"{len(prompt_token_ids)} `inputs` tokens and {params.max_new_tokens} `max_new_tokens`")
        spans, request_images = self._prepare_images(prompt_token_ids, images)
        request = Request(request_id, list(prompt_token_ids), params, next(self._arrivals), adapter=slot,
                          images=spans)
        state = _RequestState(
            request,
            IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens),
            StopChecker(params.stop, params.include_stop_str_in_output),
            time.monotonic(),
            # The first prompt token has no logprob (nothing precedes it); TGI still sends its text.
            prompt_logprobs=([TokenInfo(prompt_token_ids[0], None, self.tokenizer.decode([prompt_token_ids[0]]))]
                             if params.prompt_logprobs else None),
            images=request_images,
        )
        self._states[request_id] = state
        if params.grammar is None:
            self.scheduler.add_request(request)
            return
        compiled = self.grammars.submit(params.grammar)
        if compiled.done():
            try:
                state.matcher = GrammarMatcher(compiled.result())
            except GrammarError:
                del self._states[request_id]
                raise
            self.scheduler.add_request(request)
        else:
            self._compiling[request_id] = compiled

    def _prepare_images(self, prompt_token_ids: Sequence[int], images: Sequence[ImageInput]):
        """The images' token positions and pixels, or a ValidationError: images for a model that takes none,
        or a vision-language model's prompt whose image tokens are not its images' (typed as text, say)."""
        if self.image_encoder is not None:
            return self.image_encoder.prepare(prompt_token_ids, images)
        if images:
            reason = ("takes no images: it is a text-only model" if not hasattr(self.model, "encode_images")
                      else "has no image processor (preprocessor_config.json) to read images with")
            raise ValidationError(f"this model {reason}")
        return (), None

    def _admit_compiled(self) -> list[RequestOutput]:
        """Schedule the requests whose grammars have compiled; fail those whose grammars cannot."""
        if self._compiling and not self.scheduler.has_unfinished():
            # Nothing else to run: wait a little for a compilation rather than spin.
            concurrent.futures.wait(self._compiling.values(), timeout=0.05,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        outputs = []
        for request_id, compiled in [(i, f) for i, f in self._compiling.items() if f.done()]:
            del self._compiling[request_id]
            state = self._states[request_id]
            try:
                state.matcher = GrammarMatcher(compiled.result())
            except GrammarError as exc:
                self.scheduler.finish(state.request, FinishReason.ERROR, str(exc))
                del self._states[request_id]
                outputs.append(self._output(state, finished=True, error=str(exc)))
                continue
            self.scheduler.add_request(state.request)
        return outputs

    def abort(self, request_id: str) -> RequestOutput | None:
        """Cancel a request; its blocks are free when this returns."""
        state = self._states.pop(request_id, None)
        if state is None:
            return None
        self._compiling.pop(request_id, None)
        self.scheduler.finish(state.request, FinishReason.ABORTED)
        return self._output(state, finished=True)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._compiling)

    def unfinished_request_ids(self) -> list[str]:
        return list(self._states)

    # ---- the step ---------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; return the news of every request that has some (`last_step`: how it went)."""
        started = time.monotonic()
        outputs = self._admit_compiled() if self._compiling else []
        if self.longrope_switch is not None:
            self._recompute_past_longrope_switch()
        plan = self.scheduler.schedule()
        outputs += [self._fail(request) for request in plan.failed]
        if plan.is_empty:
            return outputs
        num_new = sum(1 for item in plan.scheduled if item.request.num_computed_tokens == 0)
        self.last_step = self._step_stats(plan, num_new, [started])  # a failure, until the step completes
        steps, sampling = self._sequence_steps(plan)
        now = time.monotonic()
        for item in plan.scheduled:
            self._states[item.request.request_id].timings.setdefault("first_scheduled", now)
        logits = self.runner.execute(steps)
        self.num_computed_prompt_tokens += sum(
            max(0, min(s.request.num_prompt_tokens, s.request.num_computed_tokens + s.num_new_tokens)
                - s.request.num_computed_tokens) for s in plan.scheduled)
        sample_rows, prompt_rows = self._split_logits(plan, steps)
        if prompt_rows:
            self._record_prompt_logprobs(logits, prompt_rows)
        # One sampling row per sampling request, or with a draft one per fed position (`tokenmill.speculate`).
        verification = Verification([plan.scheduled[i].request for i in sampling])
        sampled: dict[str, list[int]] = {}
        if verification.requests:
            rows = verification.row_requests()
            # Filled on the host while an accelerator still runs the forward.
            bitmask = fill_bitmask([self._states[r.request_id].matcher for r in rows], logits.shape[-1])
            meta = SamplingMetadata.build([r.sampling_params for r in rows], verification.histories(),
                                          [r.num_prompt_tokens for r in rows], logits.shape[-1], logits.device,
                                          eos_token_ids=self.eos_token_ids, token_bitmask=bitmask)
            # Rows only increase, so as many rows as logits means every row in order (a decode step).
            if len(sample_rows) < logits.shape[0]:
                logits = logits[host_to_device(torch.tensor(sample_rows), logits.device)]
            token_ids, logprobs, top_ids, top_lps = self.sampler(logits, meta).tolist()  # the one wait for the device
            kept = verification.kept(token_ids)
            self.speculation.record(verification, kept)
            sampled = {r.request_id: tokens for r, tokens in zip(verification.requests, kept)}
        forwarded = time.monotonic()
        self.scheduler.update(plan, sampled)
        for item in plan.scheduled:
            if item.request.images and item.request.request_id in self._states:
                ImageEncoder.release_computed(item.request, self._states[item.request.request_id].images)
        filtered = time.monotonic()
        if verification.requests:
            outputs += self._process_samples(verification, kept, logprobs, top_ids, top_lps)
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running)
        self.last_step = self._step_stats(plan, num_new, [started, now, forwarded, filtered, time.monotonic()])
        return outputs

    def _step_stats(self, plan: SchedulerOutput, num_new: int, marks: list[float]) -> StepStats:
        """The step's counts, and its phases from the times they ended (fewer than five: it failed)."""
        record = self.scheduler.step_records[-1]
        counts = dict(step=record.step, num_seqs=len(plan.scheduled), num_new_seqs=num_new,
                      num_prefill_tokens=record.num_prefill_tokens, num_decode_tokens=record.num_decode_tokens)
        if len(marks) < 5:
            return StepStats(**counts, failed=True)
        started, scheduled, forwarded, filtered, done = marks
        return StepStats(**counts, schedule_s=scheduled - started, forward_s=forwarded - scheduled,
                         filter_s=filtered - forwarded, decode_s=done - filtered, total_s=done - started)

    def _recompute_past_longrope_switch(self) -> None:
        """transformers' Phi-3 drops a sequence's cache when it first grows past the longrope switch and
        recomputes it all in one forward, with the long factors (`Phi3ForCausalLM.prepare_inputs_for_generation`):
        a sequence whose cache was computed with the short ones is recomputed from its first token, as a
        prefill of the whole sequence (its blocks kept, to be overwritten)."""
        switch = self.longrope_switch
        for request in self.scheduler.running:
            if (0 < request.num_computed_tokens <= switch < request.num_tokens
                    and request.rope_prefill_length <= switch):
                request.rope_prefill_length = request.num_tokens
                request.num_computed_tokens = 0

    def _sequence_steps(self, plan: SchedulerOutput) -> tuple[list[SequenceStep], list[int]]:
        steps, sampling = [], []
        for index, item in enumerate(plan.scheduled):
            request, start, n = item.request, item.request.num_computed_tokens, item.num_new_tokens
            samples = n == request.num_pending_tokens
            wants_prompt = request.sampling_params.prompt_logprobs and start < request.num_prompt_tokens
            # A sampling sequence needs the logits of its last token and of each draft token after it.
            num_logits = n if wants_prompt else (len(request.draft_token_ids) + 1) * samples
            embeddings = None
            if request.images:  # rows for the image tokens this step feeds, if any
                images = self._states[request.request_id].images
                embeddings = self.image_encoder.step_embeddings(request, images, start, n)
            steps.append(SequenceStep(request.pending_token_ids(start, n), start, request.block_ids, num_logits,
                                      request.adapter, embeddings, rope_prefill_length=request.rope_prefill_length))
            if samples:
                sampling.append(index)
        return steps, sampling

    @staticmethod
    def _split_logits(plan: SchedulerOutput, steps: list[SequenceStep]):
        """Rows of the logits to sample from (a sequence with a draft: one per fed position, its last token's
        and its draft's), and (request, position, row) for prompt logprobs."""
        sample_rows, prompt_rows, row = [], [], 0
        for item, step in zip(plan.scheduled, steps):
            start = step.start_position
            if step.num_logits > 1 or (step.num_logits == 1 and item.request.sampling_params.prompt_logprobs
                                       and start < item.request.num_prompt_tokens):
                for offset in range(step.num_logits):
                    position = start + len(step.token_ids) - step.num_logits + offset
                    if position + 1 < item.request.num_prompt_tokens:
                        prompt_rows.append((item.request, position + 1, row + offset))
            if item.num_new_tokens == item.request.num_pending_tokens:
                end = row + step.num_logits
                sample_rows.extend(range(end - len(item.request.draft_token_ids) - 1, end))
            row += step.num_logits
        return sample_rows, prompt_rows

    def _record_prompt_logprobs(self, logits: torch.Tensor, rows: list[tuple[Request, int, int]]) -> None:
        index = host_to_device(torch.tensor([r for _, _, r in rows]), logits.device)
        targets = host_to_device(torch.tensor([req.token_ids[pos] for req, pos, _ in rows]), logits.device)
        logprobs = torch.log_softmax(logits[index], dim=-1).gather(1, targets[:, None]).squeeze(1).tolist()
        for (request, position, _), logprob in zip(rows, logprobs):
            recorded = self._states[request.request_id].prompt_logprobs
            if len(recorded) > position:
                continue  # a recomputed prompt (preemption, longrope switch): its logprobs are already out
            token = request.token_ids[position]
            recorded.append(TokenInfo(token, logprob, self.tokenizer.decode([token])))

    def _process_samples(self, verification: Verification, kept: list[list[int]], logprobs: list[float] | None,
                         top_ids: list[list[int]] | None, top_lps: list[list[float]] | None) -> list[RequestOutput]:
        """Each request's news: its kept tokens in order, up to the first that ends it."""
        outputs = []
        now = time.monotonic()
        for request, row, tokens in zip(verification.requests, verification.starts, kept):
            state = self._states[request.request_id]
            state.timings.setdefault("first_token", now)
            infos, tops, text, reason = [], [], "", None
            first = request.num_tokens - len(tokens)  # where this step's tokens start in token_ids
            for k, token in enumerate(tokens):
                info, top, piece, reason = self._take_token(state, token, first + k + 1, row + k, logprobs, top_ids,
                                                            top_lps)
                infos.append(info)
                tops += top
                text += piece
                if reason is not None:
                    del request.token_ids[first + k + 1 :]  # verified past the end: not part of the answer
                    break
            if reason is not None:
                text += state.stop.flush()
                self.scheduler.finish(request, reason)
            outputs.append(self._output(state, infos, tops, text, finished=reason is not None))
            if reason is not None:
                del self._states[request.request_id]
        return outputs

    def _take_token(self, state: _RequestState, token: int, num_tokens: int, row: int, logprobs: list[float] | None,
                    top_ids: list[list[int]] | None, top_lps: list[list[float]] | None):
        """One new token, the `num_tokens`-th of the request, sampled in `row`: its info, top tokens, the text
        it completes and the reason it ends the request (None: it does not)."""
        request, params = state.request, state.request.sampling_params
        logprob = logprobs[row] if logprobs is not None else None
        if logprob is not None:
            state.cumulative_logprob += logprob
        special = token in self.tokenizer.all_special_ids
        info = TokenInfo(token, logprob, self.tokenizer.decode([token]), special)
        tops = []
        if params.top_n_tokens and top_ids is not None:
            tops = [[TokenInfo(t, lp, self.tokenizer.decode([t]), t in self.tokenizer.all_special_ids)
                     for t, lp in zip(top_ids[row][: params.top_n_tokens], top_lps[row][: params.top_n_tokens])]]
        # Until min_tokens are out nothing stops generation (the sampler holds the stop tokens back).
        armed = num_tokens - request.num_prompt_tokens >= params.min_tokens
        if armed and token in params.stop_token_ids and not params.include_stop_str_in_output:
            text, stopped = state.stop.add("")  # a stop token's text is dropped, as a stop string's is
        else:
            text, stopped = state.stop.add(state.detokenizer.add(token), check=armed)
        reason = self._finish_reason(request, token, num_tokens, stopped, armed)
        if state.matcher is not None:
            reason = self._follow_grammar(state, token, reason)
        return info, tops, text, reason

    @staticmethod
    def _follow_grammar(state: _RequestState, token: int, reason: FinishReason | None) -> FinishReason | None:
        """Advance the request's grammar by `token`; the grammar's end (its stop token taken) ends the request."""
        if not state.matcher.accept(token):
            # The mask allowed only tokens the grammar accepts; this is a bug, not the client's doing.
            logger.error("request %s: sampled token %d that its grammar refuses", state.request.request_id, token)
            return FinishReason.ERROR
        if state.matcher.terminated:
            return FinishReason.EOS_TOKEN
        return reason

    def _finish_reason(self, request: Request, token: int, num_tokens: int, stopped: bool,
                       armed: bool) -> FinishReason | None:
        """Why the request ends at `token`, its `num_tokens`-th token; None: it goes on."""
        params = request.sampling_params
        if armed and not params.ignore_eos and token in self.eos_token_ids:
            return FinishReason.EOS_TOKEN
        if stopped or (armed and token in params.stop_token_ids):
            return FinishReason.STOP_SEQUENCE
        if num_tokens - request.num_prompt_tokens >= params.max_new_tokens or num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _fail(self, request: Request) -> RequestOutput:
        state = self._states.pop(request.request_id)
        return self._output(state, finished=True, error=request.finish_message)

    def _output(self, state: _RequestState, tokens=(), tops=(), text: str = "", finished: bool = False,
                error: str | None = None) -> RequestOutput:
        request = state.request
        out = RequestOutput(
            request_id=request.request_id,
            new_tokens=list(tokens),
            new_top_tokens=list(tops),
            text_delta=text,
            finished=finished,
            finish_reason=request.finish_reason.value if finished and request.finish_reason else None,
            error=error,
            num_prompt_tokens=request.num_prompt_tokens,
            num_generated_tokens=request.num_output_tokens,
            num_cached_tokens=request.num_cached_tokens,
            cumulative_logprob=state.cumulative_logprob,
            seed=request.sampling_params.seed,
        )
        if not state.first_output_sent:
            out.prompt_logprobs = state.prompt_logprobs
            state.first_output_sent = True
        if finished:
            out.generated_text = state.stop.text
            end = time.monotonic()
            start = state.timings.get("first_scheduled", end)
            out.queue_time_s = start - state.arrival_time
            out.inference_time_s = end - start
            out.prefill_time_s = state.timings.get("first_token", end) - start
        return out

    # ---- batch API --------------------------------------------------------------------------------

    def generate(self, prompts: Iterable[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 adapters: Sequence[str | None] | None = None,
                 images: Sequence[Sequence[ImageInput]] | None = None) -> list[list[RequestOutput]]:
        """Run the prompts to completion together, prompt i with LoRA adapter `adapters[i]` (None, or no
        `adapters`: the base model) and images `images[i]`; every output of each, in order."""
        prompts = list(prompts)
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        adapters = list(adapters) if adapters is not None else [None] * len(prompts)
        images = list(images) if images is not None else [()] * len(prompts)
        ids = [f"batch-{next(self._arrivals)}-{i}" for i in range(len(prompts))]
        for request_id, prompt, p, adapter, pictures in zip(ids, prompts, params_list, adapters, images):
            self.add_request(request_id, prompt, p, adapter, pictures)
        results: dict[str, list[RequestOutput]] = {i: [] for i in ids}
        while any(not results[i] or not results[i][-1].finished for i in ids):
            for out in self.step():
                if out.request_id in results:
                    results[out.request_id].append(out)
        return [results[i] for i in ids]
