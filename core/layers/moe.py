"""Mixture-of-experts feed-forward blocks: a router, stacked experts run by the backend's `MoEMethod`, and
(Qwen2-MoE) a shared expert every token passes through.

Over tensor-parallel ranks each rank keeps a slice of every expert's intermediate features (its gate and
up rows, the matching down columns), as a column- then row-parallel MLP does, and the ranks' partial
outputs are summed by one all-reduce; the router is whole on every rank, so all ranks route alike.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from tokenmill.errors import ValidationError
from tokenmill.interfaces import MoEMethod, ShardStyle
from tokenmill.layers.linear import Linear
from tokenmill.parallel import SINGLE_RANK, ParallelContext

# A checkpoint's expert weights: per expert (Mixtral's w1/w3/w2 under block_sparse_moe, renamed to mlp before
# matching; Qwen's gate/up/down_proj) or stacked over experts (what transformers 5 models hold; a GGUF's fused
# ffn_gate_up_exps, same layout, comes with a .weight).
EXPERT_TENSOR = re.compile(r"model\.layers\.(?P<layer>\d+)\.mlp\.experts\."
                           r"(?:(?P<expert>\d+)\.(?P<part>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight"
                           r"|(?P<stacked>gate_up_proj|down_proj)(?:\.weight)?)")
PARTS = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def check_expert_sharding(sizes: dict[str, int], parallel: ParallelContext) -> None:
    """A `ValidationError` naming the first intermediate size (by its config name) that does not split
    evenly over the ranks."""
    for name, size in sizes.items():
        if size % parallel.world_size:
            raise ValidationError(f"cannot shard the experts' {name} of {size} over {parallel.world_size} ranks: "
                                  f"--num-shard must divide it")


class FusedExperts(nn.Module):
    """`num_experts` SwiGLU MLPs stacked into two weights, run by the backend's `MoEMethod`.

    `gate_up_proj` is (experts, 2 * intermediate, hidden), each expert's gate rows then its up rows;
    `down_proj` is (experts, hidden, intermediate); intermediate is this rank's slice. `prepare` hands
    them to the method once at load, which then owns them in its own form.
    """

    method = MoEMethod()  # the backend's, set by `prepare`

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, top_k: int, renormalize: bool,
                 dtype: torch.dtype, parallel: ParallelContext = SINGLE_RANK):
        super().__init__()
        check_expert_sharding({"intermediate size": intermediate_size}, parallel)
        local = intermediate_size // parallel.world_size
        self.num_experts, self.top_k, self.renormalize, self.parallel = num_experts, top_k, renormalize, parallel
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * local, hidden_size, dtype=dtype),
                                         requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, local, dtype=dtype), requires_grad=False)
        self.prepared: Any = None
        self._loaded: set[tuple[int, str]] = set()

    def load_expert(self, expert: int, part: str, tensor: torch.Tensor) -> None:
        """Expert `expert`'s whole `part` from the checkpoint: "gate" or "up" (intermediate, hidden), or "down"
        (hidden, intermediate); a sharded layer keeps this rank's slice, cut by the backend's plan."""
        local = self.down_proj.shape[2]
        if part == "down":
            target, style = self.down_proj.data[expert], ShardStyle.ROW
        else:
            offset = 0 if part == "gate" else local
            target, style = self.gate_up_proj.data[expert, offset:offset + local], ShardStyle.COLUMN
        if self.parallel.is_parallel:
            tensor = self.parallel.plan.shard(tensor, style, self.parallel.rank, self.parallel.world_size)
        if tensor.shape != target.shape:
            raise ValueError(f"expert {expert} {part}: expected shape {tuple(target.shape)} on this rank, "
                             f"got {tuple(tensor.shape)}")
        target.copy_(tensor)
        self._loaded.add((expert, part))

    def load_stacked(self, name: str, tensor: torch.Tensor) -> None:
        """transformers 5's stacked `gate_up_proj` (experts, 2 * intermediate, hidden) or `down_proj`."""
        if tensor.shape[0] != self.num_experts:
            raise ValueError(f"experts.{name}: {tensor.shape[0]} experts, the config says {self.num_experts}")
        for expert in range(self.num_experts):
            if name == "down_proj":
                self.load_expert(expert, "down", tensor[expert])
            else:
                gate, up = tensor[expert].chunk(2, dim=0)
                self.load_expert(expert, "gate", gate)
                self.load_expert(expert, "up", up)

    def missing(self) -> list[str]:
        """The expert weights not loaded yet, as "expert.part"."""
        return [f"{expert}.{part}" for expert in range(self.num_experts) for part in ("gate", "up", "down")
                if (expert, part) not in self._loaded]

    def prepare(self, method: MoEMethod) -> None:
        """Hand the weights to `method` in its form, once; the stacked parameters are dropped (as a linear
        layer's dense weight is when its method packs it)."""
        self.method = method
        self.prepared = method.prepare(self.gate_up_proj.data, self.down_proj.data)
        self.gate_up_proj = None
        self.down_proj = None

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        prepared = self.prepared if self.prepared is not None else (self.gate_up_proj, self.down_proj)
        y = self.method.apply(x, router_logits, prepared, self.top_k, self.renormalize)
        return self.parallel.communicator.all_reduce(y) if self.parallel.is_parallel else y


class SparseMoeBlock(nn.Module):
    """The feed-forward block of a mixture-of-experts layer: the router (`gate`) scores every expert per
    token and `experts` runs each token's `top_k`; with a `shared_expert` (Qwen2-MoE) every token also
    goes through it, scaled by ``sigmoid(shared_expert_gate(x))``."""

    def __init__(self, hidden_size: int, num_experts: int, intermediate_size: int, top_k: int, renormalize: bool,
                 dtype: torch.dtype, parallel: ParallelContext = SINGLE_RANK, shared_expert: nn.Module | None = None):
        super().__init__()
        self.gate = Linear(hidden_size, [num_experts], False, dtype)  # replicated: every rank routes alike
        self.experts = FusedExperts(num_experts, hidden_size, intermediate_size, top_k, renormalize, dtype, parallel)
        self.shared_expert = shared_expert
        self.shared_expert_gate = Linear(hidden_size, [1], False, dtype) if shared_expert is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


def load_expert_weights(model: nn.Module, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Load every expert weight of `tensors` into `model`'s `FusedExperts`; return the other tensors (Mixtral's
    block_sparse_moe renamed mlp, as transformers 5 names it) and the names of the experts' parameters.

    A `ValueError` names expert weights the checkpoint lacks.
    """
    by_path = experts_of(model)
    rest = {}
    for name, tensor in tensors.items():
        name = name.replace(".block_sparse_moe.", ".mlp.")
        match = EXPERT_TENSOR.fullmatch(name)
        if match is None:
            rest[name] = tensor
            continue
        experts = by_path.get(f"layers.{match['layer']}.mlp.experts")
        if experts is None:
            raise ValueError(f"unexpected tensor {name!r}: layer {match['layer']} has no experts")
        if match["stacked"]:
            experts.load_stacked(match["stacked"], tensor)
        else:
            experts.load_expert(int(match["expert"]), PARTS[match["part"]], tensor)
    owned = set()
    for path, experts in by_path.items():
        missing = experts.missing()
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} expert weights of {path}, e.g. "
                             f"{', '.join(missing[:5])}")
        owned |= {f"{path}.gate_up_proj", f"{path}.down_proj"}
    return rest, owned


def experts_of(model: nn.Module) -> dict[str, FusedExperts]:
    """The model's expert stacks by module path (none for a dense model)."""
    return {path: module for path, module in model.named_modules() if isinstance(module, FusedExperts)}


def graph_capturable(model: nn.Module) -> bool:
    """False where an expert stack's method reads device values back to the host (`MoEMethod.graph_capturable`):
    a backend that captures steps as graphs runs such a model eagerly."""
    return all(experts.method.graph_capturable for experts in experts_of(model).values())


def prepare_experts(model: nn.Module, method: MoEMethod) -> None:
    """Give every expert stack of `model` to the backend's `method`, once, after the weights are loaded."""
    for experts in experts_of(model).values():
        experts.prepare(method)
