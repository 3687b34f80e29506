"""A CPU stand-in for optimum-neuron's compiled causal LM: a test fixture of the neuron adapter.

Nothing here runs on Neuron or is the Neuron code. It has the interface `NeuronSlotModel` drives
(``neuron_config``, ``config``, ``forward(input_ids, position_ids, seq_ids, sampling_params)``) and the
behaviour of the two programs optimum-neuron 0.4.5 compiles (`NxDDecoderModelForCausalLM.forward` and
`KVCacheManager.update_cache` under continuous batching), as read from its source:

* context encoding takes exactly ``(ctx_batch_size, max_context_length)`` int32 tokens from position 0,
  runs them all through a causal pass, writes every position of its seq_id's cache line (padding
  included) and returns the logits at each row's largest position id;
* token generation takes exactly ``(batch_size, 1)`` int32 tokens, one per seq_id; each row attends to
  its line's cached positions below its position id, writes its key and value at that position, and
  returns its logits.

Any other shape is refused, as a compiled program has no code for it. The computation is tokenmill's
own model over a CPU cache whose blocks each line owns, so greedy tokens equal the CPU backend's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenmill.model_runner import ModelRunner, SequenceStep
from tokenmill.models import get_model_class, kv_cache_shape
from tokenmill.parallel import SINGLE_RANK
from tokenmill.plugins.cpu.attention import CPUKVCacheLayout, CPUPagedAttention

BLOCK_SIZE = 16


@dataclass
class StandInNeuronConfig:
    """The `NxDNeuronConfig` attributes the adapter and the programs read (the real class needs optimum-neuron)."""

    batch_size: int
    sequence_length: int
    max_context_length: int | None = None
    continuous_batching: bool = True
    on_device_sampling: bool = False

    def __post_init__(self) -> None:
        if self.max_context_length is None:
            self.max_context_length = self.sequence_length

    @property
    def ctx_batch_size(self) -> int:
        return 1 if self.continuous_batching else self.batch_size

    @property
    def tkg_batch_size(self) -> int:
        return self.batch_size


@dataclass
class ProgramCall:
    """One run of a compiled program, as the test sees it."""

    program: str  # "context_encoding" or "token_generation"
    seq_ids: list[int]
    positions: list[list[int]]


class CompiledPrograms:
    """The traced model: one callable holding both programs, chosen by the input's shape."""

    def __init__(self, checkpoint: Any, neuron_config: Any, padded_vocab: int = 0):
        self.neuron_config = neuron_config
        self.padded_vocab = padded_vocab  # extra head columns, masked to the dtype's minimum as under TP
        dtype = next(iter(checkpoint.tensors.values())).dtype
        layout = CPUKVCacheLayout(kv_cache_shape(checkpoint.config, dtype, SINGLE_RANK), torch.device("cpu"),
                                  block_size=BLOCK_SIZE)
        attention = {}

        def make_attention(spec):
            return attention.setdefault(spec, CPUPagedAttention(spec, layout))

        model = functools.partial(get_model_class(checkpoint.config), parallel=SINGLE_RANK)(
            checkpoint.config, make_attention, dtype)
        model.load_weights(dict(checkpoint.tensors))
        model.eval()
        self.blocks_per_line = -(-neuron_config.sequence_length // BLOCK_SIZE)
        self.runner = ModelRunner(model, model, layout.allocate(neuron_config.batch_size * self.blocks_per_line),
                                  list(attention.values()), BLOCK_SIZE, torch.device("cpu"))
        self.calls: list[ProgramCall] = []

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, seq_ids: torch.Tensor,
                 sampling_params: torch.Tensor) -> torch.Tensor:
        for name, tensor in (("input_ids", input_ids), ("position_ids", position_ids), ("seq_ids", seq_ids)):
            if tensor.dtype != torch.int32:
                raise TypeError(f"the compiled program takes int32 {name}, got {tensor.dtype}")
        config = self.neuron_config
        rows, width = input_ids.shape
        if position_ids.shape != input_ids.shape or seq_ids.shape != (rows,) or sampling_params.shape != (rows, 3):
            raise ValueError(f"inputs of mismatched shapes: {input_ids.shape}, {position_ids.shape}, "
                             f"{seq_ids.shape}, {sampling_params.shape}")
        if len(set(seq_ids.tolist())) != rows or not all(0 <= s < config.batch_size for s in seq_ids.tolist()):
            raise ValueError(f"seq_ids must be distinct cache lines in [0, {config.batch_size}): {seq_ids.tolist()}")
        if (rows, width) == (config.ctx_batch_size, config.max_context_length):
            logits = self._context_encoding(input_ids, position_ids, seq_ids)
        elif (rows, width) == (config.tkg_batch_size, 1):
            logits = self._token_generation(input_ids, position_ids, seq_ids)
        else:
            raise ValueError(f"no compiled program takes input_ids of shape {tuple(input_ids.shape)}: context "
                             f"encoding is ({config.ctx_batch_size}, {config.max_context_length}), token "
                             f"generation ({config.tkg_batch_size}, 1)")
        if self.padded_vocab:
            padding = torch.full((rows, self.padded_vocab), torch.finfo(logits.dtype).min)
            logits = torch.cat([logits, padding], dim=1)
        return logits.unsqueeze(1)  # (rows, 1, vocab): the last position only, as the program returns

    def _line(self, seq_id: int, num_tokens: int) -> range:
        first = seq_id * self.blocks_per_line
        return range(first, first + -(-num_tokens // BLOCK_SIZE))

    def _context_encoding(self, input_ids, position_ids, seq_ids) -> torch.Tensor:
        if int(position_ids[:, 0].max()) != 0:
            raise ValueError("context encoding starts at position 0")
        width = input_ids.shape[1]
        self.calls.append(ProgramCall("context_encoding", seq_ids.tolist(), position_ids.tolist()))
        steps = [SequenceStep(input_ids[r].tolist(), 0, self._line(int(seq_ids[r]), width), width)
                 for r in range(input_ids.shape[0])]
        logits = self.runner.execute(steps).view(input_ids.shape[0], width, -1)
        last = torch.max(position_ids, dim=1).indices  # the program's row choice, padding included
        return logits[torch.arange(input_ids.shape[0]), last]

    def _token_generation(self, input_ids, position_ids, seq_ids) -> torch.Tensor:
        positions = position_ids[:, 0].tolist()
        if max(positions) >= self.neuron_config.sequence_length:
            raise ValueError(f"position {max(positions)} is past the compiled sequence length")
        self.calls.append(ProgramCall("token_generation", seq_ids.tolist(), position_ids.tolist()))
        steps = [SequenceStep([int(input_ids[r, 0])], positions[r], self._line(int(seq_ids[r]), positions[r] + 1), 1)
                 for r in range(input_ids.shape[0])]
        return self.runner.execute(steps)


@dataclass
class CompiledCausalLMStandIn:
    """The model object `NeuronModelForCausalLM.from_pretrained` / `export` would return, on the CPU.

    `forward` picks the program by `NxDModelForCausalLM.forward`'s rule (its condition is checked against the
    installed source in tests/neuron/test_optimum_neuron_api.py), and hands
    the inputs to `context_encoding_model` or `token_generation_model`: by default the programs
    themselves, so the caller must send the compiled shapes; optimum-neuron's runtime wrappers
    (`NxDDecoderWrapperForCausalLM`) can be put in between where optimum-neuron is installed.
    """

    config: Any  # the transformers config
    neuron_config: Any
    programs: CompiledPrograms
    context_encoding_model: Any = None
    token_generation_model: Any = None
    forwards: int = field(default=0)

    def __post_init__(self) -> None:
        self.context_encoding_model = self.context_encoding_model or self.programs
        self.token_generation_model = self.token_generation_model or self.programs

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, seq_ids: torch.Tensor | None = None,
                sampling_params: torch.Tensor | None = None) -> torch.Tensor:
        self.forwards += 1
        if input_ids.shape[-1] > 1 and not position_ids.min().item():
            return self.context_encoding_model(input_ids, position_ids, seq_ids, sampling_params)
        return self.token_generation_model(input_ids, position_ids, seq_ids, sampling_params)

    __call__ = forward


def compiled_standin(checkpoint: Any, neuron_config: Any, padded_vocab: int = 0) -> CompiledCausalLMStandIn:
    """A stand-in compiled model for `checkpoint` (tokenmill's, with weights) and `neuron_config`'s shapes."""
    return CompiledCausalLMStandIn(checkpoint.config, neuron_config,
                                   CompiledPrograms(checkpoint, neuron_config, padded_vocab))
