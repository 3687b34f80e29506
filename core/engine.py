"""The engine: schedule -> run the model -> sample -> update -> report, one step at a time.

`Engine` is synchronous and single-threaded. `AsyncEngine` (in `async_engine.py`) runs it on a
thread for the serving layer; the conformance suite and benchmarks use `Engine.generate`.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import logging
import time
from typing import Any, Iterable, Sequence

import torch

from tokenmill.backend import Backend, resolve_backend
from tokenmill.block_manager import BlockManager
from tokenmill.config import EngineConfig
from tokenmill.detokenizer import IncrementalDetokenizer, StopChecker
from tokenmill.errors import ValidationError
from tokenmill.grammar import GrammarCompiler, GrammarError
from tokenmill.grammar.matcher import GrammarMatcher, fill_bitmask
from tokenmill.interfaces import SlotModel
from tokenmill.kv_cache_dtype import AUTO, parse_kv_cache_dtype, resolve_kv_cache_dtype
from tokenmill.kv_cache_sizing import count_kv_blocks, kv_cache_layout, profile_largest_step
from tokenmill.layers.rotary import context_length, longrope_switch_length, rope_depends_on_length
from tokenmill.linear_methods import checkpoint_method, linear_method, prepared_weights_entry
from tokenmill.loader import Checkpoint, load_checkpoint, parse_dtype
from tokenmill.lora.adapters import LoRAAdapters, load_adapters
from tokenmill.model_loading import check_model_implementation, load_model, use_backend_ops
from tokenmill.model_runner import ModelRunner, SequenceStep, StepPadding, StepShape, host_to_device
from tokenmill.models import get_model_class, model_implementation, text_config_of
from tokenmill.multimodal import ImageInput
from tokenmill.multimodal.encoder import ImageEncoder
from tokenmill.outputs import RequestOutput, StepStats, TokenInfo
from tokenmill.parallel import SINGLE_RANK, ParallelContext
from tokenmill.request import FinishReason, Request
from tokenmill.request_outputs import RequestState, TokenReader, request_output
from tokenmill.sampler import Sampler, SamplingMetadata
from tokenmill.sampling_params import SamplingParams
from tokenmill.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from tokenmill.slots import PREFIX_CACHING_UNAVAILABLE, SlotAllocator, SlotRunner
from tokenmill.speculate import NgramSpeculator, SpeculationStats, Verification
from tokenmill.step_shapes import reachable_step_shapes

PREFIX_CACHING_LENGTH_DEPENDENT_ROPE = "disabled (the model's RoPE scaling depends on each prompt's length)"

logger = logging.getLogger(__name__)




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
        self.prepared_weights = (None if checkpoint is not None
                                 else prepared_weights_entry(config, self.backend, self.dtype, self.parallel))
        self._restoring = self.prepared_weights is not None and self.prepared_weights.exists()
        self.checkpoint = checkpoint or load_checkpoint(config.model_id, self.dtype, progress=config.progress,
                                                        cache_dir=config.cache_dir, load_format=config.load_format,
                                                        weights=not self._restoring,
                                                        cached_config=not self.backend.runs_own_model)
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
            scheduler_config = SchedulerConfig(config.max_num_batched_tokens, config.max_num_seqs,
                                               step_target_s=config.step_target_s)
        else:
            buckets = None  # the model pads to its compiled shapes itself
            scheduler_config = self._use_slot_model(config, executor)
        self.scheduler = Scheduler(scheduler_config, self.block_manager, buckets)
        self.eos_token_ids = set(self.checkpoint.eos_token_ids)
        self.sampler = Sampler(config.seed, self.backend.token_mask(), self.backend.greedy_pick())
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
        self._states: dict[str, RequestState] = {}
        self._arrivals = itertools.count()
        self.num_computed_prompt_tokens = 0  # prompt tokens actually run through the model (prefix hits excluded)
        self.last_step: StepStats | None = None  # what the latest step ran, for the batch metrics
        self.token_reader = TokenReader(self.tokenizer, self.eos_token_ids, self.max_model_len)

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
                               model.mixes_prefill_and_decode, model.chunked_prefill, config.step_target_s)

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
        self.model_implementation = model_implementation(model_class)
        check_model_implementation(self.model_implementation, config, self.checkpoint)
        if config.enable_prefix_caching and rope_depends_on_length(self.text_config):
            # A prompt token's key is rotated for its own prompt's length: the same prefix in another
            # prompt has other keys (`tokenmill.layers.rotary`), so blocks cannot be shared.
            self.prefix_caching = PREFIX_CACHING_LENGTH_DEPENDENT_ROPE
            logger.warning("prefix caching: %s", self.prefix_caching)
        quantized_method = checkpoint_method(config, self.backend, self.dtype, self.checkpoint)
        self.layout = kv_cache_layout(config, self.backend, model_config, self.dtype, self.parallel, self.device)
        self._attention: dict = {}  # one backend object per distinct layer spec, filled as the model is built
        self.model = load_model(functools.partial(model_class, parallel=self.parallel), config, self.checkpoint,
                                self._make_attention, self.dtype, self.device,
                                quantized_method or linear_method(config, self.backend, self.dtype),
                                self.prepared_weights, self._restoring)
        use_backend_ops(self.model, self.backend, self.dtype)
        if config.lora_adapters:  # before compile_model: a captured step must see the adapted layers
            self.lora = load_adapters(self.model, config.lora_adapters, self.backend.lora_method(self.dtype),
                                      self.dtype, self.device)

        attention = list(self._attention.values())
        largest_step = max(1, min(config.max_num_batched_tokens, self.max_model_len, context_length(self.text_config)))
        profile = functools.partial(profile_largest_step, self.model, attention, self.layout, self.device,
                                    self.platform.inference_mode, largest_step, config.max_num_seqs)
        self.num_blocks = count_kv_blocks(config, self.backend, self.layout, self.model, self.parallel, self.device,
                                          profile)
        self.kv_caches = self.layout.allocate(self.num_blocks)
        buckets = self.backend.shape_buckets(config.max_num_batched_tokens, config.max_num_seqs)
        forward = self.backend.compile_model(self.model, buckets, config.graph_batch_sizes)
        padding = None if buckets is None else StepPadding(  # tables up to a width bucket, or the longest context
            buckets, -(-self.max_model_len // self.layout.block_size), self.max_model_len, self.layout.block_size)
        self.runner = ModelRunner(self.model, forward, self.kv_caches, attention, self.layout.block_size,
                                  self.device, padding, self.platform.sampling_device, self.platform.inference_mode,
                                  self.lora)
        self.block_manager = self._new_block_manager()
        processor = getattr(self.checkpoint, "processor", None)
        if hasattr(self.model, "encode_images") and processor is not None:
            self.image_encoder = ImageEncoder(self.model, processor.image_processor)
        return buckets

    def _make_attention(self, spec):
        backend = self.backend.attention(spec, self.layout)
        self._attention[spec] = backend
        return backend

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
        """A step of every padded shape the scheduler can make (`tokenmill.step_shapes`), keyed by that shape."""
        if self.scheduler.has_unfinished():
            raise RuntimeError("warm-up writes the KV cache's free blocks: run it before adding requests")
        longest = min(self.max_model_len, self.kv_capacity_tokens)  # the longest context a request can have
        return reachable_step_shapes(self.runner.padding, self.layout.block_size, self.scheduler.max_tokens_per_step,
                                     self.scheduler.max_seqs_per_step, longest, self.num_blocks)

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
        state = RequestState(
            request,
            IncrementalDetokenizer(self.token_reader.decoder, prompt_token_ids, params.skip_special_tokens),
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
                outputs.append(request_output(state, finished=True, error=str(exc)))
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
        return request_output(state, finished=True)

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
        self.scheduler.observe_step(self.last_step.total_s)
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
                info, top, piece, reason = self.token_reader.take_token(state, token, first + k + 1, row + k, logprobs,
                                                                    top_ids, top_lps)
                infos.append(info)
                tops += top
                text += piece
                if reason is not None:
                    del request.token_ids[first + k + 1 :]  # verified past the end: not part of the answer
                    break
            if reason is not None:
                text += state.stop.flush()
                self.scheduler.finish(request, reason)
            outputs.append(request_output(state, infos, tops, text, finished=reason is not None))
            if reason is not None:
                del self._states[request.request_id]
        return outputs

    def _fail(self, request: Request) -> RequestOutput:
        state = self._states.pop(request.request_id)
        return request_output(state, finished=True, error=request.finish_message)

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
