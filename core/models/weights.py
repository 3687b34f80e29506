"""Loading a transformers checkpoint into one of our models: the part every family shares.

Our modules keep transformers' names, except where we fuse (q/k/v into `qkv_proj`, gate/up into
`gate_up_proj`) or name a layer by its role (StarCoder2's `c_fc` is our `up_proj`). `packed` says where
such a checkpoint tensor lands; LoRA adapters (`tokenmill.lora`) find their layers through it too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenmill.interfaces import GGMLWeight, QuantizedWeight
from tokenmill.layers.linear import Linear
from tokenmill.layers.vocab_parallel import Embedding, lm_head
from tokenmill.parallel import ParallelContext


class CheckpointLoading:
    """`load_weights` and `load_ggml_weights` for an `nn.Module` model with `parallel` and
    `tie_word_embeddings` attributes, whose module names are the checkpoint's after `packed`."""

    # Checkpoint suffix -> (our module, shard): shard i of a fused parameter, or None for the whole
    # parameter (already fused in the checkpoint, as Phi-3's qkv_proj, or only named otherwise).
    packed: dict[str, tuple[str, int | None]] = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    parallel: ParallelContext
    tie_word_embeddings: bool
    subclass_loaded_prefixes: tuple[str, ...] = ()  # parameter prefixes a subclass loads itself (a vision tower)

    def load_weights(self: Any, tensors: dict[str, torch.Tensor], loaded_elsewhere: set[str] = frozenset()) -> None:
        """Copy transformers-named tensors in, fusing q/k/v and gate/up; unknown or missing names raise.

        `loaded_elsewhere` names parameters a subclass filled itself (stacked experts), not missing here;
        parameters under `subclass_loaded_prefixes` (a vision tower) are not this method's at all."""
        params = {k: v for k, v in self.named_parameters() if not k.startswith(self.subclass_loaded_prefixes)}
        loaded = set(loaded_elsewhere)
        for name, tensor in tensors.items():
            if "rotary_emb.inv_freq" in name or (name == "lm_head.weight" and self.tie_word_embeddings):
                continue
            local = name.removeprefix("model.")
            module_path, _, kind = local.rpartition(".")
            parent, _, leaf = module_path.rpartition(".")
            if leaf in self.packed:
                fused, shard = self.packed[leaf]
                target = f"{parent}.{fused}" if parent else fused
                module = self.get_submodule(target)
                if shard is None:
                    module.load_fused(kind, tensor)
                else:
                    module.load_shard(kind, tensor, shard)
                loaded.add(f"{target}.{kind}")
            elif local in params:
                module = self.get_submodule(module_path)
                if self.parallel.is_parallel and hasattr(module, "load_shard"):
                    module.load_shard(kind, tensor)  # a sharded layer keeps this rank's part
                elif params[local].shape != tensor.shape:
                    raise ValueError(f"{name}: expected shape {tuple(params[local].shape)}, got {tuple(tensor.shape)}")
                else:
                    params[local].data.copy_(tensor)
                loaded.add(local)
            else:
                raise ValueError(f"unexpected tensor {name!r} for {type(self).__name__}")
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} tensors, e.g. {', '.join(missing[:5])}")

    def load_quantized_weights(self: Any, weights: dict[str, QuantizedWeight]) -> None:
        """Give each linear layer its pre-quantized (transformers-named) weight in place of a dense one; call
        before `load_weights`, which then no longer expects those layers' dense weights."""
        for name, weight in weights.items():
            module_path, _, kind = name.removeprefix("model.").rpartition(".")
            parent, _, leaf = module_path.rpartition(".")
            fused, shard = self.packed.get(leaf, (leaf, None))
            try:
                module = self.get_submodule(f"{parent}.{fused}" if parent else fused)
            except AttributeError:  # experts stacked in one tensor, for one
                module = None
            if not isinstance(module, Linear) or kind != "weight":
                raise ValueError(f"{name} is pre-quantized, but {type(self).__name__} runs it as no linear layer")
            module.load_quantized_shard(weight, shard)

    def load_ggml_weights(self: Any, weights: dict[str, GGMLWeight]) -> None:
        """Give each linear layer the GGUF blocks of its (transformers-named) weight, for backends whose
        linear method runs them; call after `load_weights`. Non-linear weights are ignored."""
        for name, weight in weights.items():
            if name == "model.embed_tokens.weight" and self.tie_word_embeddings:
                self.lm_head.load_ggml_shard(weight)  # the head is the embedding: its matmuls may read the blocks
                continue
            module_path, _, kind = name.removeprefix("model.").rpartition(".")
            parent, _, leaf = module_path.rpartition(".")
            fused, shard = self.packed.get(leaf, (leaf, None))
            module = self.get_submodule(f"{parent}.{fused}" if parent else fused)
            if isinstance(module, Linear) and kind == "weight":
                module.load_ggml_shard(weight, shard)


def output_head(config: Any, embed_tokens: nn.Module, dtype: torch.dtype, parallel: ParallelContext,
                bias: bool = False) -> tuple[Linear, bool]:
    """The output head, and whether it is the embedding (tie_word_embeddings)."""
    head = lm_head(config.hidden_size, config.vocab_size, dtype, parallel, bias)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied and isinstance(embed_tokens, Embedding):
        embed_tokens.tie_to(head)  # one tensor; once the head is prepared, possibly only the head's form of it
    elif tied:
        head.weight = embed_tokens.weight  # one tensor; the method may give the head its own prepared copy
    return head, tied
