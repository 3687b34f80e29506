"""optimum-neuron's compiled causal LM as a `SlotModel`: tokenmill schedules and samples, the model computes.

A model compiled by optimum-neuron (0.4.5, `NxDModelForCausalLM`) keeps each sequence's keys and values
in one line of a static cache, addressed by `seq_ids`, and has two programs of fixed shapes:

* context encoding: one prompt (``ctx_batch_size`` is 1 under continuous batching) from position 0,
  padded to ``max_context_length``; it writes its seq_id's whole cache line and returns the logits at
  the largest position id, the prompt's last token;
* token generation: one token for each of the ``batch_size`` seq_ids at once; each row attends to the
  cached positions below its own and writes its key and value at its position.

The model's ``forward(input_ids, position_ids, seq_ids, sampling_params)`` picks the program from the
inputs: more than one token with a first position of 0 is context encoding, anything else token
generation. So a step holds prefills or decodes, never both, a prompt is fed whole from position 0
(``mixes_prefill_and_decode = chunked_prefill = False``), and a one-token prompt is a token-generation
row at position 0, as optimum-neuron's own vLLM runner sends it.

tokenmill samples on the host, so the model must be compiled with on-device sampling off: it then
returns float logits, ``(rows, 1, vocab)``, of each row's last token only (no prompt logprobs).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from tokenmill.errors import BackendUnavailableError, ValidationError
from tokenmill.interfaces import SlotBatch, SlotModel
from tokenmill.probe import module_available

logger = logging.getLogger(__name__)

# What the compiled model needs at run time, by import name: the distribution each comes in.
SDK_MODULES = {
    "optimum.neuron": "optimum-neuron",
    "torch_neuronx": "torch-neuronx",
    "neuronx_distributed": "neuronx-distributed",
}
SDK_HINT = ("install the Neuron SDK from AWS's package index (pip install 'optimum-neuron[neuronx]' "
            "--extra-index-url https://pip.repos.neuron.amazonaws.com), on an Inferentia or Trainium instance")
NEURON_CONFIG_FILE = "neuron_config.json"
SAMPLING_PARAMS_WIDTH = 3  # top_k, top_p, temperature per row: read only by on-device sampling, which is off


def load_compiled_model(model_id: str, dtype: torch.dtype, max_num_seqs: int, max_model_len: int) -> Any:
    """A `NeuronModelForCausalLM` for `model_id`: loaded if compiled, else compiled for these sizes.

    optimum-neuron's vLLM loader (`optimum/neuron/vllm/model_loader.py`) is the reference: a folder with a
    NeuronConfig is a compiled model (`from_pretrained`); otherwise `get_neuron_config` sizes it
    (batch = `max_num_seqs`, sequence = `max_model_len`, tensor parallel over every visible NeuronCore)
    and `export(load_weights=True)` compiles it, taking the artifacts from the Neuron cache when a
    matching entry exists. Unlike vLLM it turns on-device sampling off: tokenmill samples the logits.
    """
    missing = [dist for module, dist in SDK_MODULES.items() if not module_available(module)]
    if missing:
        raise BackendUnavailableError(f"the neuron backend runs optimum-neuron's compiled model, which needs "
                                      f"{', '.join(missing)} (not installed): {SDK_HINT}")
    from optimum.neuron import NeuronModelForCausalLM
    from optimum.neuron.configuration_utils import NeuronConfig

    try:
        NeuronConfig.from_pretrained(model_id, NEURON_CONFIG_FILE)
        compiled = True
    except EnvironmentError:
        compiled = False
    if compiled:
        logger.info("loading the Neuron model compiled in %s", model_id)
        return NeuronModelForCausalLM.from_pretrained(model_id)
    logger.info("compiling %s for Neuron: %d sequences of %d tokens (minutes without a cache entry)",
                model_id, max_num_seqs, max_model_len)
    neuron_config = NeuronModelForCausalLM.get_neuron_config(
        model_id, batch_size=max_num_seqs, sequence_length=max_model_len,
        tensor_parallel_size=None)  # None: every NeuronCore this process sees (NEURON_RT_VISIBLE_CORES)
    neuron_config.on_device_sampling = False
    neuron_config.torch_dtype = dtype
    return NeuronModelForCausalLM.export(model_id, neuron_config=neuron_config, load_weights=True)


def check_model_source(model_id: str, checkpoint_format: str) -> None:
    """Refuse what optimum-neuron cannot compile: it reads a Hugging Face folder or hub id itself."""
    if checkpoint_format == "gguf" or Path(model_id).suffix == ".gguf":
        raise ValidationError(f"the neuron backend compiles Hugging Face checkpoints (a folder or hub id with a "
                              f"config.json), not GGUF: got {model_id!r}")


class NeuronSlotModel(SlotModel):
    """A compiled optimum-neuron causal LM driven slot by slot: tokenmill's slots are its `seq_ids`.

    `model` is what `load_compiled_model` returns, or anything with its interface: ``neuron_config``
    (``batch_size``, ``sequence_length``, ``max_context_length``, ``continuous_batching``,
    ``on_device_sampling``), a transformers ``config`` and ``forward(input_ids, position_ids, seq_ids,
    sampling_params)``. The adapter feeds it the compiled shapes exactly (the wrapper's own padding
    would repeat row 0's position into the padding slots' cache lines, live ones included) and keeps
    each slot's length to place the padding rows where nothing is read.
    """

    mixes_prefill_and_decode = False  # separate context-encoding and token-generation programs
    chunked_prefill = False  # context encoding starts at position 0 and writes the whole cache line

    def __init__(self, model: Any):
        config = model.neuron_config
        if config.on_device_sampling:
            raise ValidationError("this Neuron model was compiled with on-device sampling, so it returns tokens, "
                                  "not logits; tokenmill samples on the host: export it with "
                                  "neuron_config.on_device_sampling = False")
        if config.batch_size > 1 and not config.continuous_batching:
            raise ValidationError(f"this Neuron model was compiled for a static batch of {config.batch_size} "
                                  "without continuous batching, so one prompt cannot be encoded into one slot; "
                                  "export it with continuous_batching=True")
        self.model = model
        self.num_slots = config.batch_size
        self.max_seq_len = config.sequence_length
        self.max_prompt_len = config.max_context_length
        text_config = model.config.get_text_config()
        self.vocab_size = text_config.vocab_size
        self.pad_token_id = 0 if text_config.pad_token_id is None else text_config.pad_token_id
        self.lengths = torch.zeros(self.num_slots, dtype=torch.int64)  # tokens each slot's cache line holds

    def forward(self, batch: SlotBatch) -> torch.Tensor:
        if batch.num_seqs and int(batch.num_logits.max()) > 1:
            raise ValidationError("a compiled Neuron model returns the logits of each sequence's last token only: "
                                  "prompt logprobs are not available on the neuron backend")
        starts = batch.query_start_loc[:-1]
        num_tokens = batch.query_start_loc[1:] - starts
        first = batch.positions[starts]
        self._check(batch.slot_ids, first, num_tokens)
        self.lengths[batch.slot_ids] = first + num_tokens

        logits: list[torch.Tensor | None] = [None] * batch.num_seqs
        single = (num_tokens == 1).nonzero().flatten()
        if len(single):
            rows = self._generate(batch.slot_ids[single], batch.input_ids[starts[single]], first[single])
            for i, row in zip(single.tolist(), rows):
                logits[i] = row
        for i in (num_tokens > 1).nonzero().flatten().tolist():
            start, end = int(starts[i]), int(starts[i] + num_tokens[i])
            logits[i] = self._encode_prompt(int(batch.slot_ids[i]), batch.input_ids[start:end])
        wanted = [row for row, n in zip(logits, batch.num_logits.tolist()) if n]
        if not wanted:
            return torch.empty(0, self.vocab_size)
        return torch.stack(wanted)[:, :self.vocab_size].float()  # the head may be padded past the vocabulary

    def free(self, slot: int) -> None:
        self.lengths[slot] = 0

    def _check(self, slots: torch.Tensor, first: torch.Tensor, num_tokens: torch.Tensor) -> None:
        """Refuse, before anything runs, a step the compiled programs would run wrongly without a word.

        The model trusts its caller: a wrong position would read another request's cached tokens, and a
        prompt longer than the context-encoding program would be cut.
        """
        held = self.lengths[slots]
        if not torch.equal(first, held):
            i = int((first != held).nonzero()[0])
            raise RuntimeError(f"slot {int(slots[i])} holds {int(held[i])} tokens but the step feeds it from "
                               f"position {int(first[i])}: a slot is fed in order and freed before reuse")
        resumed = (num_tokens > 1) & (first > 0)
        if resumed.any():
            raise ValidationError("a compiled Neuron model encodes a prompt whole, from position 0; it cannot "
                                  "continue a sequence with several tokens (chunked prefill, prefix reuse)")
        too_long = first + num_tokens > self.max_seq_len
        if too_long.any():
            raise ValidationError(f"a sequence would pass the {self.max_seq_len} tokens the Neuron model was "
                                  "compiled for")
        if (num_tokens > self.max_prompt_len).any():
            raise ValidationError(f"a prompt of {int(num_tokens.max())} tokens is longer than the "
                                  f"{self.max_prompt_len} the Neuron model's context encoding was compiled for")

    def _encode_prompt(self, slot: int, tokens: torch.Tensor) -> torch.Tensor:
        """Context encoding of one whole prompt into `slot`'s cache line; the logits of its last token."""
        n = tokens.shape[0]
        input_ids = torch.full((1, self.max_prompt_len), self.pad_token_id, dtype=torch.int32)
        input_ids[0, :n] = tokens
        # Padding positions are 0, below the last token's, so the program's largest-position row is that
        # token for any prompt of two or more tokens (the wrapper's own pad value, 1, ties with a 2-token one).
        position_ids = torch.zeros((1, self.max_prompt_len), dtype=torch.int32)
        position_ids[0, :n] = torch.arange(n, dtype=torch.int32)
        return self._run(input_ids, position_ids, torch.tensor([slot], dtype=torch.int32))[0]

    def _generate(self, slots: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token generation over every slot at once, in seq_id order; the logits of the rows in `slots`.

        A slot with no token this step gets a padding row at its next free position (its length, already
        updated for this step): the program writes a key and value there that no row reads before the
        slot's own next token overwrites it. A full slot, which can take no more tokens, pads at its last.
        """
        position_ids = self.lengths.clamp(max=self.max_seq_len - 1).to(torch.int32).view(-1, 1)
        position_ids[slots, 0] = positions.to(torch.int32)
        input_ids = torch.full((self.num_slots, 1), self.pad_token_id, dtype=torch.int32)
        input_ids[slots, 0] = tokens.to(torch.int32)
        seq_ids = torch.arange(self.num_slots, dtype=torch.int32)
        return self._run(input_ids, position_ids, seq_ids)[slots]

    def _run(self, input_ids: torch.Tensor, position_ids: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
        sampling_params = torch.ones(input_ids.shape[0], SAMPLING_PARAMS_WIDTH, dtype=torch.float32)
        output = self.model(input_ids, position_ids=position_ids, seq_ids=seq_ids, sampling_params=sampling_params)
        return output[:, -1, :]
