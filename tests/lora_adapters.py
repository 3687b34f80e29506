"""Random LoRA adapters in PEFT's file layout for the tiny models, and the merged-weights reference.

`write_adapter` writes what `PeftModel.save_pretrained` writes (adapter_config.json and
adapter_model.safetensors, tensors named ``base_model.model.<module>.lora_A.weight``), without peft.
`merged_checkpoint` folds adapters into a copy of the base weights, ``W + scale * B @ A`` in float32,
straight from those files: the model an adapter stands for, run as a plain checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file

from tokenmill.loader import Checkpoint

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def _modules(model: torch.nn.Module, targets: Sequence[str]) -> dict[str, torch.nn.Linear]:
    """The transformers model's decoder linears whose leaf name is in `targets`, by module name."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.rpartition(".")[2] in targets and ".layers." in name}


def write_adapter(folder: Path, reference: torch.nn.Module, targets: Sequence[str], rank: int = 8,
                  alpha: float = 16.0, seed: int = 0, use_rslora: bool = False, std: float = 0.1,
                  **config: Any) -> Path:
    """A random adapter for `reference` (a transformers model) over modules named `targets`, in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in _modules(reference, targets).items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, module.in_features,
                                                                        generator=generator) * std
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(module.out_features, rank,
                                                                        generator=generator) * std
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    adapter_config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "use_rslora": use_rslora,
                      "target_modules": list(targets), "bias": "none", "use_dora": False, "modules_to_save": None,
                      "fan_in_fan_out": False, "lora_dropout": 0.0, "task_type": "CAUSAL_LM", **config}
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config))
    return folder


def merged_checkpoint(base: Checkpoint, adapter: Path) -> Checkpoint:
    """`base` with `adapter` merged into its weights: W + scale * B @ A, computed in float32."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    rank, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    tensors = {name: tensor.clone() for name, tensor in base.tensors.items()}
    for key, a in lora.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("base_model.model.").partition(".lora_A.")[0]
        b = lora[key.replace(".lora_A.", ".lora_B.")]
        weight = tensors[f"{module}.weight"]
        tensors[f"{module}.weight"] = (weight.float() + scale * b.float() @ a.float()).to(weight.dtype)
    return Checkpoint(base.config, tensors, base.tokenizer, f"{base.source}+{adapter.name}", base.format,
                      base.eos_token_ids)
