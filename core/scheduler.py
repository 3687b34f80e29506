"""Continuous batching under a token budget (no torch).

One rule for every request: each step grants it some of the tokens it has not computed yet.
Decodes are served first (one token each), then requests part-way through their prompt, then waiting
requests in arrival order; a long prompt is cut to the remaining budget (chunked prefill), so it never
stalls running decodes. With a step target (`tokenmill.prefill_pacing`), prompts beside running decodes
get only the tokens that keep the step near it, so a decode's next token is not held up by a long prefill.
When blocks run out, the most recently arrived running request is preempted: its blocks are freed and it
goes back to the front of the queue, to be recomputed later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tokenmill.block_manager import BlockManager
from tokenmill.interfaces import ShapeBuckets
from tokenmill.prefill_pacing import PrefillPacer
from tokenmill.request import FinishReason, Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048  # tokens per step (TGI: max_batch_prefill_tokens)
    max_num_seqs: int = 128  # sequences per step and concurrently running
    # What the model can run (`SlotModel`'s flags): False makes every step all prefills or all decodes,
    # and feeds each prompt whole in one step.
    mix_prefill_and_decode: bool = True
    chunked_prefill: bool = True
    # Wall time a step beside running decodes should take (`PrefillPacer`); None: prompts take the whole budget.
    step_target_s: float | None = None
    prefill_floor_tokens: int = 64  # prompt tokens a paced step may always feed

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be at least 1")
        if self.step_target_s is not None and (self.step_target_s <= 0 or self.prefill_floor_tokens < 1):
            raise ValueError("step_target_s must be positive and prefill_floor_tokens at least 1")


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens fed this step, starting at request.num_computed_tokens


@dataclass(frozen=True)
class StepRecord:
    """What one step did, for tests, metrics and tuning."""

    step: int
    num_prefill_tokens: int
    num_decode_tokens: int
    request_ids: tuple[str, ...]
    num_preempted: int


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    num_tokens: int
    preempted: list[Request] = field(default_factory=list)
    failed: list[Request] = field(default_factory=list)  # finished with an error while scheduling
    padded_num_tokens: int | None = None  # with shape buckets: the bucket this step is padded to
    padded_num_seqs: int | None = None

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, buckets: ShapeBuckets | None = None,
                 max_records: int = 4096):
        self.config = config
        self.blocks = block_manager
        self.buckets = buckets
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.step_records: deque[StepRecord] = deque(maxlen=max_records)
        self.num_preemptions = 0
        self._step = 0
        self.max_tokens_per_step = config.max_num_batched_tokens
        self.max_seqs_per_step = config.max_num_seqs
        if buckets is not None:
            self.max_tokens_per_step = min(self.max_tokens_per_step, buckets.num_tokens[-1])
            self.max_seqs_per_step = min(self.max_seqs_per_step, buckets.num_seqs[-1])
        # Paced only where a step mixes decodes with prompt chunks: elsewhere decodes never wait beside a prompt.
        self.pacer = PrefillPacer(config.step_target_s, config.prefill_floor_tokens) \
            if config.step_target_s is not None and config.mix_prefill_and_decode and config.chunked_prefill else None

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def observe_step(self, seconds: float) -> None:
        """How long the last scheduled step took, start to finish (the pacer learns from it)."""
        if self.pacer is not None and self.step_records:
            record = self.step_records[-1]
            self.pacer.observe(record.num_prefill_tokens, record.num_decode_tokens, seconds)

    def add_request(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        if self.pacer is not None:
            request.queued_at_s = self.pacer.clock_s
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        if self.config.mix_prefill_and_decode:
            output = self._schedule(None)
        else:
            # Prefill steps first, so free slots fill; decodes run when no request can start or continue
            # its prompt. Admission is bounded by the running limit, so decodes never wait for long.
            output = self._schedule("prefill")
            if not output.scheduled:
                decodes = self._schedule("decode")
                decodes.preempted[:0], decodes.failed[:0] = output.preempted, output.failed
                output = decodes
        self._record(output)
        return output

    def _schedule(self, phase: str | None) -> SchedulerOutput:
        """One step's plan; `phase` "prefill" or "decode" takes only requests of that kind, None takes all."""
        budget = self.max_tokens_per_step
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []
        failed: list[Request] = []

        # Decodes first, then prompts part-way through prefill; arrival order within each.
        order = sorted(self.running, key=lambda r: (r.num_tokens - r.num_computed_tokens > 1, r.arrival_index))
        # Prompt tokens this step may feed: all of the budget, or beside decodes what the pacer allows.
        prompt_budget = budget
        if self.pacer is not None and phase is None and any(self._is_decode(r) for r in order):
            queued = [r.queued_at_s for r in order if not self._is_decode(r)]
            if self.waiting:  # in arrival order, a preempted request back at the front
                queued.append(self.waiting[0].queued_at_s)
            prompt_budget = self.pacer.prefill_tokens(budget, min(queued, default=None))
        for request in order:
            if budget == 0 or len(scheduled) == self.max_seqs_per_step:
                break
            if request.status is not RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            if phase is not None and (phase == "decode") != self._is_decode(request):
                continue
            is_prompt = not self._is_decode(request)
            if is_prompt and prompt_budget == 0:
                continue
            limit = min(budget, prompt_budget) if is_prompt else budget
            num_new = min(request.num_pending_tokens, limit)
            while not self.blocks.append(request, num_new):
                if request.draft_token_ids:  # a guess is not worth preempting anyone: drop it first
                    request.draft_token_ids = []
                    num_new = min(request.num_pending_tokens, limit)
                    continue
                victim = max((r for r in self.running if r.status is RequestStatus.RUNNING),
                             key=lambda r: r.arrival_index)
                if victim is request and self._only_one_holding_blocks(request):
                    # Alone and still out of blocks: it can never finish, so fail it instead of looping.
                    self._finish(request, FinishReason.ERROR, f"needs more than the {self.blocks.num_blocks} "
                                                              "KV-cache blocks the cache has")
                    failed.append(request)
                    break
                victim_was_prompt = not self._is_decode(victim)
                self._preempt(victim)
                preempted.append(victim)
                for item in [item for item in scheduled if item.request is victim]:
                    scheduled.remove(item)  # scheduled earlier in this step: give its tokens back
                    budget += item.num_new_tokens
                    if victim_was_prompt:
                        prompt_budget += item.num_new_tokens
                if victim is request:
                    break
            if request.status is RequestStatus.RUNNING:
                # A budget cut short of the whole draft verifies what fits (with the last token, one at least).
                del request.draft_token_ids[max(0, num_new - (request.num_tokens - request.num_computed_tokens)):]
                scheduled.append(ScheduledRequest(request, num_new))
                budget -= num_new
                if is_prompt:
                    prompt_budget -= num_new

        while phase != "decode" and self.waiting and not preempted and min(budget, prompt_budget) > 0 \
                and len(self.running) < self.config.max_num_seqs and len(scheduled) < self.max_seqs_per_step:
            request = self.waiting[0]
            if not request.block_ids:
                request.num_cached_tokens = self.blocks.allocate_prefix(request)
                request.num_computed_tokens = request.num_cached_tokens
            num_new = min(request.num_tokens - request.num_computed_tokens, budget, prompt_budget)
            if num_new < request.num_tokens - request.num_computed_tokens and not self.config.chunked_prefill:
                self.blocks.free_request(request)
                request.num_computed_tokens = 0
                if budget < self.max_tokens_per_step:
                    break  # the whole prompt may fit a later step
                self.waiting.popleft()
                self._finish(request, FinishReason.ERROR,
                             f"its {request.num_tokens} tokens are more than the {self.max_tokens_per_step} a step "
                             "may feed, and this backend cannot feed a prompt in parts")
                failed.append(request)
                continue
            if not self.blocks.append(request, num_new):
                self.blocks.free_request(request)
                request.num_computed_tokens = 0
                if not self.running and not scheduled:
                    # Nothing else holds blocks, so it can never fit: fail it rather than wait forever.
                    self.waiting.popleft()
                    self._finish(request, FinishReason.ERROR,
                                 f"needs {self.blocks.blocks_needed(request.num_tokens)} KV-cache blocks, "
                                 f"the cache has {self.blocks.num_blocks}")
                    failed.append(request)
                    continue
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new
            prompt_budget -= num_new

        self.running = [r for r in self.running if r.status is RequestStatus.RUNNING]
        output = SchedulerOutput(scheduled, self.max_tokens_per_step - budget, preempted, failed)
        if self.buckets is not None and scheduled:
            output.padded_num_tokens = self.buckets.pad_num_tokens(output.num_tokens)
            output.padded_num_seqs = self.buckets.pad_num_seqs(len(scheduled))
        return output

    def update(self, output: SchedulerOutput, sampled: dict[str, list[int]]) -> None:
        """Advance every scheduled request past this step's tokens and append the tokens it sampled: one,
        or with a draft, the draft tokens verified and the token after them."""
        for item in output.scheduled:
            request = item.request
            if request.is_finished:  # aborted while the step ran
                continue
            request.num_computed_tokens += item.num_new_tokens
            tokens = sampled.get(request.request_id)
            if tokens:
                request.token_ids += tokens
                # Rejected draft positions were computed for tokens that are not the sequence's: they are
                # no longer computed (the next step overwrites their cache slots), and blocks past the
                # sequence go back to the pool.
                request.num_computed_tokens = min(request.num_computed_tokens, request.num_tokens - 1)
                request.draft_token_ids = []
                self.blocks.release_tail(request, request.num_tokens)
            self.blocks.commit_full_blocks(request)

    def finish(self, request: Request, reason: FinishReason, message: str = "") -> None:
        """End a request (stop condition met, client gone): its blocks are free at once."""
        if request.is_finished:
            return
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._finish(request, reason, message)

    @staticmethod
    def _is_decode(request: Request) -> bool:
        return request.num_computed_tokens > 0 and request.num_tokens - request.num_computed_tokens == 1

    def _only_one_holding_blocks(self, request: Request) -> bool:
        return all(r is request or r.status is not RequestStatus.RUNNING for r in self.running)

    def _finish(self, request: Request, reason: FinishReason, message: str) -> None:
        self.blocks.free_request(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.finish_message = message

    def _preempt(self, request: Request) -> None:
        self.blocks.free_request(request)
        request.draft_token_ids = []  # it comes back as a prompt to recompute
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _record(self, output: SchedulerOutput) -> None:
        # Decode tokens: the last sampled token of a running sequence, and its draft tokens if any.
        decode = sum(s.num_new_tokens for s in output.scheduled
                     if s.request.num_tokens - s.request.num_computed_tokens == 1
                     and s.request.num_computed_tokens >= s.request.num_prompt_tokens)
        self.step_records.append(StepRecord(
            step=self._step,
            num_prefill_tokens=output.num_tokens - decode,
            num_decode_tokens=decode,
            request_ids=tuple(s.request.request_id for s in output.scheduled),
            num_preempted=len(output.preempted),
        ))
        self._step += 1
