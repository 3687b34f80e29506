"""Choosing the next token for every sequence of a step at once: tensor operations over the batch.

Order of processing (TGI's, with vLLM's additions): the watermark, additive biases (`logit_bias`, and
the stop tokens masked while a request is short of `min_tokens`), repetition, frequency and presence
penalties, the grammar mask (structured output: one bitmask for the batch, `tokenmill.grammar`), temperature, top-k, top-p, typical-p, min-p. Reported logprobs are the log-softmax of the
processed logits (what TGI reports; for greedy requests that is the model's own distribution, after
the watermark, biases and penalties when any are set).

Seeded requests draw with the exponential race (`argmax(p / E)`, `E ~ Exp(1)`), with `E` derived
from a counter-based hash of (seed, step, token id): the draw of a seeded request depends on nothing
else in the batch. Unseeded requests take `E` from the engine's generator for the logits' device.

Every tensor lives on the logits' device and nothing here reads a value back to the host, so on an
accelerator a step's sampling is queued behind its forward without a sync (`tokenmill.sync_audit`
checks it). The settings are built on the host and sent in one asynchronous copy per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Sequence

import torch

from tokenmill.interfaces import GreedyPick, TokenMask
from tokenmill.model_runner import host_to_device
from tokenmill.sampling_params import SamplingParams
from tokenmill.watermark import WatermarkBatch, mix32

_MASK32 = 0xFFFFFFFF


@dataclass
class SamplingMetadata:
    """The batch's sampling settings as tensors, built once per step."""

    all_greedy: bool
    greedy: torch.Tensor  # (B,) bool
    temperature: torch.Tensor  # (B, 1)
    top_k: torch.Tensor | None  # (B,) int64, vocab size where off
    top_p: torch.Tensor | None  # (B, 1)
    typical_p: torch.Tensor | None
    min_p: torch.Tensor | None
    repetition_penalty: torch.Tensor | None  # (B, 1)
    frequency_penalty: torch.Tensor | None
    presence_penalty: torch.Tensor | None
    bias_ids: torch.Tensor | None  # (B, K) int64: token ids whose logits get `bias_values`, padded with vocab_size
    bias_values: torch.Tensor | None  # (B, K): logit_bias, and -inf on stop tokens held back by min_tokens
    watermark: WatermarkBatch | None
    history: torch.Tensor | None  # (B, L) prompt + output ids, padded with vocab_size
    output_history: torch.Tensor | None  # (B, Lo) output ids, padded with vocab_size
    seeds: torch.Tensor | None  # (B,) int64, -1 where unseeded
    steps: torch.Tensor | None  # (B,) int64: index of the token being drawn, per request
    max_top_n: int
    needs_logprobs: bool
    all_seeded: bool = False  # every row seeded: no row draws from the generator
    token_bitmask: torch.Tensor | None = None  # (B, ceil(vocab / 32)) int32 allowed tokens; None: no grammar

    @classmethod
    def build(cls, params: Sequence[SamplingParams], token_ids: Sequence[Sequence[int]],
              num_prompt_tokens: Sequence[int], vocab_size: int, device: torch.device,
              eos_token_ids: Collection[int] = (), token_bitmask: torch.Tensor | None = None) -> "SamplingMetadata":
        """`token_bitmask`: the grammars' allowed tokens, from `tokenmill.grammar.matcher.fill_bitmask`, on the host."""
        meta = cls._build(params, token_ids, num_prompt_tokens, vocab_size, device, eos_token_ids)
        if token_bitmask is not None:
            meta.token_bitmask = host_to_device(token_bitmask, device)
        return meta

    @classmethod
    def _build(cls, params: Sequence[SamplingParams], token_ids: Sequence[Sequence[int]],
               num_prompt_tokens: Sequence[int], vocab_size: int, device: torch.device,
               eos_token_ids: Collection[int]) -> "SamplingMetadata":
        batch = len(params)
        max_top_n = max((p.top_n_tokens for p in params), default=0)
        needs_logprobs = any(p.logprobs for p in params) or max_top_n > 0
        greedy = [p.is_greedy for p in params]

        def send(values, dtype):
            return host_to_device(torch.tensor(values, dtype=dtype), device)

        biases = _biases(params, token_ids, num_prompt_tokens, eos_token_ids, vocab_size)
        bias_ids = bias_values = None
        if biases is not None:
            bias_ids, bias_values = send(biases[0], torch.int64), send(biases[1], torch.float32)
        watermark = WatermarkBatch.build(params, token_ids, device)
        all_greedy = (all(greedy) and not any(p.needs_history for p in params) and biases is None
                      and watermark is None)
        if all_greedy:
            off = dict.fromkeys(("top_k", "top_p", "typical_p", "min_p", "repetition_penalty", "frequency_penalty",
                                 "presence_penalty", "bias_ids", "bias_values", "watermark", "history",
                                 "output_history", "seeds", "steps"))
            return cls(all_greedy=True, greedy=torch.ones(batch, dtype=torch.bool, device=device),
                       temperature=torch.ones(batch, 1, device=device), max_top_n=max_top_n,
                       needs_logprobs=needs_logprobs, **off)

        def column(values):
            return send(values, torch.float32).view(-1, 1)

        def optional(name, off, unreachable=None):
            # Rows that turned a filter off get a value the filter can never act on, so float rounding
            # in cumulative sums cannot trim their tails.
            values = [getattr(p, name) for p in params]
            if all(v == off for v in values):
                return None
            return column([unreachable if unreachable is not None and v == off else v for v in values])

        top_k = None
        if any(p.top_k for p in params):
            top_k = send([p.top_k or vocab_size for p in params], torch.int64)
        history = output_history = None
        if any(p.needs_history for p in params):
            history = _pad([list(t) for t in token_ids], vocab_size, device)
            output_history = _pad([list(t[n:]) for t, n in zip(token_ids, num_prompt_tokens)], vocab_size, device)
        seeds = steps = None
        if any(p.seed is not None for p in params):
            # All 64 bits of the seed count: its halves are folded together into a 32-bit key.
            seeds = send([-1 if p.seed is None else _fold_seed(p.seed) for p in params], torch.int64)
            steps = send([len(t) - n for t, n in zip(token_ids, num_prompt_tokens)], torch.int64)
        return cls(
            all_greedy=False,
            greedy=send(greedy, torch.bool),
            temperature=column([p.temperature or 1.0 for p in params]),
            top_k=top_k,
            top_p=optional("top_p", 1.0, unreachable=2.0),
            typical_p=optional("typical_p", 1.0, unreachable=2.0),
            min_p=optional("min_p", 0.0),
            repetition_penalty=optional("repetition_penalty", 1.0),
            frequency_penalty=optional("frequency_penalty", 0.0),
            presence_penalty=optional("presence_penalty", 0.0),
            bias_ids=bias_ids,
            bias_values=bias_values,
            watermark=watermark,
            history=history,
            output_history=output_history,
            seeds=seeds,
            steps=steps,
            max_top_n=max_top_n,
            needs_logprobs=needs_logprobs,
            all_seeded=all(p.seed is not None for p in params),
        )


def _biases(params: Sequence[SamplingParams], token_ids: Sequence[Sequence[int]], num_prompt_tokens: Sequence[int],
            eos_token_ids: Collection[int], vocab_size: int) -> tuple[list[list[int]], list[list[float]]] | None:
    """Per row, the token ids and values added to its logits: its `logit_bias`, and -inf on its stop
    tokens (EOS and `stop_token_ids`) while it has generated fewer than `min_tokens` tokens, unless a
    grammar decides where the text ends. Rows are padded with the id `vocab_size`, a column past the
    logits; None when no row has any bias."""
    rows = []
    for p, tokens, num_prompt in zip(params, token_ids, num_prompt_tokens):
        row = [(i, b) for i, b in p.logit_bias if i < vocab_size]
        if len(tokens) - num_prompt < p.min_tokens and p.grammar is None:
            row += [(i, float("-inf")) for i in {*eos_token_ids, *p.stop_token_ids} if 0 <= i < vocab_size]
        rows.append(row)
    width = max(len(row) for row in rows)
    if not width:
        return None
    return ([[i for i, _ in row] + [vocab_size] * (width - len(row)) for row in rows],
            [[b for _, b in row] + [0.0] * (width - len(row)) for row in rows])


def _pad(rows: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0) or 1
    return host_to_device(torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.int64), device)


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # (B,) int64
    logprobs: torch.Tensor | None  # (B,) chosen tokens' logprobs
    top_token_ids: torch.Tensor | None  # (B, max_top_n)
    top_logprobs: torch.Tensor | None

    def tolist(self) -> tuple[list[int], list[float] | None, list[list[int]] | None, list[list[float]] | None]:
        """The step's one read from the device: token ids, with the logprobs in the same transfer."""
        if self.logprobs is None:
            return self.token_ids.tolist(), None, None, None
        # float64 holds every token id and float32 logprob exactly, so one tensor carries them all.
        columns = [self.token_ids[:, None], self.logprobs[:, None]]
        if self.top_token_ids is not None:
            columns += [self.top_token_ids, self.top_logprobs]
        rows = torch.cat([c.double() for c in columns], dim=1).tolist()
        token_ids = [int(row[0]) for row in rows]
        logprobs = [row[1] for row in rows]
        if self.top_token_ids is None:
            return token_ids, logprobs, None, None
        n = self.top_token_ids.shape[1]
        return token_ids, logprobs, [[int(t) for t in row[2 : 2 + n]] for row in rows], [row[2 + n :] for row in rows]


class Sampler:
    def __init__(self, seed: int | None = None, token_mask: TokenMask | None = None,
                 greedy_pick: GreedyPick | None = None):
        self.seed = seed
        self.token_mask = token_mask or TokenMask()  # the backend's grammar-mask kernel (`tokenmill_token_mask`)
        self.greedy_pick = greedy_pick or GreedyPick()  # the backend's greedy kernel (`tokenmill_greedy_pick`)
        self._generators: dict[torch.device, torch.Generator | None] = {}

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The generator of unseeded draws on `device`, made on first use; None where the device has none."""
        if device not in self._generators:
            try:
                generator = torch.Generator(device)
            except RuntimeError:  # meta: its draws hold no values, so there is nothing to make reproducible
                generator = None
            if generator is not None and self.seed is not None:
                generator.manual_seed(self.seed)
            self._generators[device] = generator
        return self._generators[device]

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        logits = logits.float()
        if meta.all_greedy:
            logits = self._apply_grammar(logits, meta)
            if not meta.max_top_n:  # the token and its logprob from one kernel, no (rows, vocab) logprobs
                tokens, chosen = self.greedy_pick.pick(logits, meta.needs_logprobs)
                return SamplerOutput(tokens, chosen, None, None)
            tokens = logits.argmax(dim=-1)
            return self._report(logits, tokens, meta)
        logits = self._apply_biases(logits, meta)
        logits = self._apply_penalties(logits, meta)
        logits = self._apply_grammar(logits, meta)
        greedy_tokens = logits.argmax(dim=-1)
        processed = self._warp(logits / meta.temperature, meta)
        probs = torch.softmax(processed, dim=-1)
        sampled = (probs / self._exponentials(probs, meta)).argmax(dim=-1)
        tokens = torch.where(meta.greedy, greedy_tokens, sampled)
        # Greedy rows report the penalised distribution; sampled rows the fully processed one.
        return self._report(torch.where(meta.greedy[:, None], logits, processed), tokens, meta)

    def _report(self, logits: torch.Tensor, tokens: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        if not meta.needs_logprobs:
            return SamplerOutput(tokens, None, None, None)
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)
        top_ids = top_lp = None
        if meta.max_top_n:
            top_lp, top_ids = logprobs.topk(meta.max_top_n, dim=-1)
        return SamplerOutput(tokens, chosen, top_ids, top_lp)

    def _apply_grammar(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """Every disallowed token of every constrained row at -inf, in one call for the whole batch."""
        if meta.token_bitmask is None:
            return logits
        return self.token_mask.apply(logits, meta.token_bitmask)

    @staticmethod
    def _apply_biases(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """The watermark, then each row's additive biases scattered into one (B, vocab) tensor."""
        if meta.watermark is not None:
            logits = meta.watermark.apply(logits)
        if meta.bias_ids is not None:
            vocab = logits.shape[1]
            bias = torch.zeros(logits.shape[0], vocab + 1, device=logits.device)
            bias.scatter_add_(1, meta.bias_ids, meta.bias_values)
            logits = logits + bias[:, :vocab]
        return logits

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        vocab = logits.shape[1]
        if meta.repetition_penalty is not None:
            seen = torch.zeros(logits.shape[0], vocab + 1, dtype=torch.bool, device=logits.device)
            seen.scatter_(1, meta.history, True)
            seen = seen[:, :vocab]
            penalty = meta.repetition_penalty
            penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits = torch.where(seen, penalised, logits)
        if meta.frequency_penalty is not None or meta.presence_penalty is not None:
            counts = torch.zeros(logits.shape[0], vocab + 1, device=logits.device)
            counts.scatter_add_(1, meta.output_history, torch.ones_like(meta.output_history, dtype=torch.float32))
            counts = counts[:, :vocab]
            if meta.frequency_penalty is not None:
                logits = logits - meta.frequency_penalty * counts
            if meta.presence_penalty is not None:
                logits = logits - meta.presence_penalty * (counts > 0).float()
        return logits

    @staticmethod
    def _warp(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        neg_inf = float("-inf")
        if meta.top_k is not None:
            # A top_k past the vocabulary keeps every token (an out-of-range index would fail the whole batch).
            kth_index = (meta.top_k - 1).clamp(min=0, max=logits.shape[-1] - 1)
            kth = logits.sort(dim=-1, descending=True).values.gather(1, kth_index[:, None])
            logits = logits.masked_fill(logits < kth, neg_inf)
        if meta.top_p is not None:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
            remove_sorted = before >= meta.top_p
            remove_sorted[:, 0] = False
            logits = logits.masked_fill(remove_sorted.scatter(1, order, remove_sorted), neg_inf)
        if meta.typical_p is not None:
            logits = _typical(logits, meta.typical_p)
        if meta.min_p is not None:
            probs = logits.softmax(dim=-1)
            threshold = meta.min_p * probs.max(dim=-1, keepdim=True).values
            logits = logits.masked_fill(probs < threshold, neg_inf)
        return logits

    def _exponentials(self, probs: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        if meta.seeds is not None:
            hashed = _hash_uniform(meta.seeds, meta.steps, probs.shape[1])
            if meta.all_seeded:
                return -torch.log(hashed)
        uniform = torch.rand(probs.shape, generator=self.generator(probs.device), device=probs.device)
        uniform.clamp_(min=1e-10)
        if meta.seeds is not None:
            # Every row is hashed and the unseeded ones discarded: picking the seeded rows out would
            # need their count on the host.
            uniform = torch.where((meta.seeds >= 0)[:, None], hashed, uniform)
        return -torch.log(uniform)


def _typical(logits: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling: keep the tokens closest to the entropy, up to `mass` probability."""
    log_probs = logits.log_softmax(dim=-1)
    probs = log_probs.exp()
    entropy = -(torch.nan_to_num(log_probs * probs)).sum(dim=-1, keepdim=True)
    shifted = (-log_probs - entropy).abs()
    sorted_shift, order = shifted.sort(dim=-1)
    cumulative = probs.gather(1, order).cumsum(dim=-1)
    last = (cumulative < mass).sum(dim=-1, keepdim=True).clamp(max=logits.shape[1] - 1)
    remove_sorted = sorted_shift > sorted_shift.gather(1, last)
    return logits.masked_fill(remove_sorted.scatter(1, order, remove_sorted), float("-inf"))


def _fold_seed(seed: int) -> int:
    """A 32-bit key from a 64-bit seed (MurmurHash3's finaliser over both halves, in Python ints)."""
    def fmix(h: int) -> int:
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & _MASK32
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & _MASK32
        return h ^ (h >> 16)

    return fmix((seed & _MASK32) ^ fmix((seed >> 32) & _MASK32))


def _hash_uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniforms in (0, 1) from (seed, step, token id) alone: (rows, vocab)."""
    row = mix32(mix32(seeds) + steps * 0x9E3779B1)[:, None]
    h = mix32(row ^ mix32(torch.arange(vocab, dtype=torch.int64, device=seeds.device)[None, :] + 0x27D4EB2F))
    return (h.double() + 0.5).div_(2**32).float()
