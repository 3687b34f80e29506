"""The router's view of generation: tokenize, admit (or refuse with 429), stream or collect outputs.

It drives either the router's `ReplicaRouter` (model servers behind gRPC) or an in-process `AsyncEngine`
(tests, embedding): both have the same `generate`. Neither is imported here: the router process never
imports the engine (nor torch).
"""

from __future__ import annotations

import contextlib
import itertools
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Sequence

from tokenmill.api.errors import ModelLoadingError, OverloadedError, ShuttingDownError, UnknownModelError
from tokenmill.api.metrics import request_taken
from tokenmill.api.settings import ServerSettings
from tokenmill.errors import GenerationError, ValidationError
from tokenmill.grammar import GrammarSpec
from tokenmill.multimodal import ImageInput
from tokenmill.outputs import RequestOutput, TokenInfo
from tokenmill.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tokenmill.api.router import ReplicaRouter
    from tokenmill.async_engine import AsyncEngine


@dataclass
class Generation:
    """A finished request, its step outputs gathered."""

    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    top_tokens: list[list[TokenInfo]] = field(default_factory=list)
    finish_reason: str = "length"
    num_prompt_tokens: int = 0
    prompt_logprobs: list[TokenInfo] | None = None
    seed: int | None = None
    queue_time_s: float = 0.0
    inference_time_s: float = 0.0

    @property
    def mean_logprob(self) -> float:
        values = [t.logprob for t in self.tokens if t.logprob is not None]
        return sum(values) / len(values) if values else float("-inf")

    def add(self, out: RequestOutput) -> None:
        self.tokens += out.new_tokens
        self.top_tokens += out.new_top_tokens
        self.num_prompt_tokens = out.num_prompt_tokens
        self.seed = out.seed
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.finished:
            self.text = out.generated_text or ""
            self.finish_reason = out.finish_reason or "length"
            self.queue_time_s = out.queue_time_s or 0.0
            self.inference_time_s = out.inference_time_s or 0.0


class GenerationService:
    def __init__(self, engine: AsyncEngine | ReplicaRouter, tokenizer: Any, settings: ServerSettings,
                 metrics: Any = None):
        self.engine = engine
        self.metrics = metrics
        self.tokenizer = tokenizer
        self.settings = settings
        self.in_flight = 0
        self._ids = itertools.count()
        self.ready = False
        self.draining = False  # after SIGTERM: no new requests, in-flight ones finish
        self.images: Any = None  # `tokenmill.api.images.ImagePrompts` for a vision-language model; None: text only

    def checked(self) -> "GenerationService":
        """This service, if it can take generation requests (else 503: loading, or draining)."""
        if self.draining:
            raise ShuttingDownError()
        if not self.ready:
            raise ModelLoadingError()
        request_taken()
        return self

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids

    @contextlib.contextmanager
    def admit(self):
        """A permit for one client request, held for its whole stream (TGI's semaphore, no waiting)."""
        self.checked()
        if self.in_flight >= self.settings.max_concurrent_requests:
            raise OverloadedError()
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    def new_id(self) -> str:
        return f"{uuid.uuid4().hex[:12]}-{next(self._ids)}"

    def adapter_id(self, adapter_id: str | None) -> str | None:
        """The LoRA adapter TGI's `adapter_id` names; None for the base model (no id, an empty one, or the
        model's own). An adapter that is not loaded is a 422, not the base model's answer."""
        if not adapter_id or adapter_id == self.settings.model_id:
            return None
        if adapter_id not in self.settings.adapters:
            loaded = ", ".join(self.settings.adapters) or "none (start with --lora-adapters)"
            raise ValidationError(f"`adapter_id` {adapter_id!r} is not a loaded LoRA adapter; loaded: {loaded}")
        return adapter_id

    def model_adapter(self, model: str | None) -> str | None:
        """The LoRA adapter OpenAI's `model` names; None for the base model.

        With adapters loaded, `model` must be the model's id or an adapter's name: any other is a 404, as
        OpenAI and vLLM answer. Without adapters, any name means the one model, as TGI takes it.
        """
        if model in self.settings.adapters:
            return model
        if model and model != self.settings.model_id and self.settings.adapters:
            raise UnknownModelError(model)
        return None

    async def compile_grammar(self, grammar: GrammarSpec | None) -> None:
        """Wait for `grammar`'s compilation (on the engine's pool, off its step loop): a grammar that cannot
        compile is a `GrammarError` (422) before a streamed answer starts. Replicas behind gRPC compile on
        their side, when the request reaches them (`AsyncEngine.generate`), and answer INVALID_ARGUMENT."""
        if grammar is not None and hasattr(self.engine, "compile_grammar"):
            await self.engine.compile_grammar(grammar)

    async def stream(self, prompt_ids: Sequence[int], params: SamplingParams, adapter: str | None = None,
                     images: Sequence[ImageInput] = ()) -> AsyncIterator[RequestOutput]:
        observed = self.metrics.engine_request(len(prompt_ids), params.max_new_tokens) if self.metrics else None
        async for out in self.engine.generate(self.new_id(), prompt_ids, params, adapter, images):
            if out.error:
                raise GenerationError(f"Request failed during generation: {out.error}")
            if observed is not None:
                observed.output(out)
            yield out

    async def complete(self, prompt_ids: Sequence[int], params: SamplingParams, adapter: str | None = None,
                       images: Sequence[ImageInput] = ()) -> Generation:
        generation = Generation()
        async for out in self.stream(prompt_ids, params, adapter, images):
            generation.add(out)
        return generation
