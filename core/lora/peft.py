"""LoRA adapters read from PEFT's own files, without importing peft.

A PEFT LoRA adapter is a folder with ``adapter_config.json`` (``r``, ``lora_alpha``, ``use_rslora``,
``target_modules``, ...) and ``adapter_model.safetensors``, whose tensors are named after the module they
adapt: ``base_model.model.<module>.lora_A.weight`` of shape (r, in_features) and ``...lora_B.weight`` of
shape (out_features, r). The adapted layer computes ``W x + scale * B (A x)`` with ``scale = alpha / r``,
or ``alpha / sqrt(r)`` with rsLoRA. The tensors present say which modules are adapted (they are what
``target_modules`` selected when the adapter was trained).

Anything that changes that computation and is not implemented (DoRA, trained biases, extra trained
modules, per-module rank or alpha patterns, ...) is refused here, at load, with the setting's name:
serving an adapter with part of it silently dropped would answer with a different model.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenmill.errors import ValidationError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# A saved tensor: the module's path, then lora_A or lora_B, then (older PEFT) the adapter's own name.
_TENSOR_NAME = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<kind>[AB])(?:\.[^.]+)?\.weight$")

# Settings that change what the adapted layer computes, and the value under which they do nothing.
_UNSUPPORTED = {
    "use_dora": (False, "DoRA (weight-decomposed LoRA)"),
    "modules_to_save": (None, "fully trained extra modules (modules_to_save)"),
    "bias": ("none", "trained biases (bias other than \"none\")"),
    "lora_bias": (False, "a bias on lora_B (lora_bias)"),
    "fan_in_fan_out": (False, "transposed (Conv1D) weights (fan_in_fan_out)"),
    "rank_pattern": ({}, "per-module ranks (rank_pattern)"),
    "alpha_pattern": ({}, "per-module alphas (alpha_pattern)"),
    "layer_replication": (None, "layer replication"),
    "use_qalora": (False, "QA-LoRA"),
    "alora_invocation_tokens": (None, "activated LoRA (alora_invocation_tokens)"),
    "trainable_token_indices": (None, "trained token embeddings (trainable_token_indices)"),
    "target_parameters": (None, "LoRA on parameters rather than modules (target_parameters)"),
    "use_bdlora": (None, "block-diagonal LoRA (use_bdlora)"),
    "arrow_config": (None, "Arrow routing (arrow_config)"),
}


@dataclass(frozen=True)
class PeftAdapter:
    """One adapter as read from disk: per adapted module, its A (r, in) and its B (out, r) scaled.

    `modules` is keyed by the module's transformers name (``model.layers.0.self_attn.q_proj``); B already
    carries the adapter's scale, so a layer adds ``B (A x)``. Tensors are float32, on the host.
    """

    name: str
    path: Path
    rank: int
    alpha: float
    use_rslora: bool
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank


def read_peft_adapter(name: str, path: str | Path) -> PeftAdapter:
    """Read the PEFT LoRA adapter in folder `path`; a `ValidationError` says what is wrong or unsupported."""
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    where = f"LoRA adapter {name!r} ({path})"
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_file.is_file():
        raise ValidationError(f"{where}: no {CONFIG_FILE}; expected a PEFT adapter folder "
                              f"(what PeftModel.save_pretrained writes)")
    if not weights_file.is_file():
        pickled = " (only the pickled adapter_model.bin is there: re-save it with safe_serialization=True)" \
            if (path / "adapter_model.bin").exists() else ""
        raise ValidationError(f"{where}: no {WEIGHTS_FILE}{pickled}")
    config = json.loads(config_file.read_text())
    rank, alpha, use_rslora = _check_config(where, config)
    scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
    modules = _modules(where, load_file(str(weights_file)), rank, scale)
    return PeftAdapter(name, path, rank, alpha, use_rslora, modules)


def _check_config(where: str, config: dict) -> tuple[int, float, bool]:
    """(r, lora_alpha, use_rslora), after refusing every setting this server does not implement."""
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise ValidationError(f"{where}: peft_type {peft_type!r} is not supported; only LORA adapters are")
    for key, (neutral, what) in _UNSUPPORTED.items():
        value = config.get(key, neutral)
        if value != neutral and value not in (None, False, {}, [], ""):
            raise ValidationError(f"{where}: {what} is not supported ({key}={json.dumps(value)}); "
                                  "plain LoRA on the attention and MLP projections is")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise ValidationError(f"{where}: adapter_config.json must give a positive integer rank r, got {rank!r}")
    alpha = config.get("lora_alpha", 8)  # PEFT's default
    if not isinstance(alpha, (int, float)):
        raise ValidationError(f"{where}: lora_alpha must be a number, got {alpha!r}")
    return rank, float(alpha), bool(config.get("use_rslora", False))


def _modules(where: str, tensors: dict[str, torch.Tensor], rank: int,
             scale: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(A, scale * B) per adapted module, checked for shape and completeness."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _TENSOR_NAME.match(key)
        if match is None:
            kind = ("DoRA magnitudes" if "lora_magnitude_vector" in key else
                    "an embedding adapter" if "lora_embedding" in key else "a tensor this server cannot place")
            raise ValidationError(f"{where}: {key!r} is {kind}; only lora_A/lora_B weights of linear layers are "
                                  "supported")
        pairs.setdefault(match["module"], {})[match["kind"]] = tensor.float()
    if not pairs:
        raise ValidationError(f"{where}: {WEIGHTS_FILE} holds no lora_A/lora_B weights")
    modules = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise ValidationError(f"{where}: {module} has lora_{''.join(pair)} but not both lora_A and lora_B")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise ValidationError(f"{where}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                                  f"expected (r, in) and (out, r) with r={rank} as adapter_config.json says")
        modules[module] = (a.contiguous(), (b * scale).contiguous())
    return modules
