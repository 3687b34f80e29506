"""`--load-format dummy`'s weights: the model built on its device and filled there from a fixed seed.

Apart from `tokenmill.loader.dummy` (config and tokenizer), which the router process reads without torch.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

DUMMY_INIT_STD = 0.02  # the usual initialiser range: activations stay finite through 32+ layers in bf16


def build_dummy_model(model_class: Callable[..., nn.Module], config: Any, make_attention: Callable,
                      dtype: torch.dtype, device: torch.device, seed: int = 0) -> nn.Module:
    """`model_class(config, make_attention, dtype)` built on `device` with seeded random weights.

    Every parameter is allocated on `device` (torch's default-device context) and filled in place there,
    in `dtype`: weights ~ N(0, 0.02), biases 0, norm scales 1. On the `meta` device nothing is
    allocated or filled: that builds the shape alone, to count parameters.
    """
    with torch.device(device):
        model = model_class(config, make_attention, dtype)
    init_dummy_weights(model, seed)
    return model


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Fill `model`'s parameters in place, on their device, from `seed` (see `build_dummy_model`)."""
    from tokenmill.layers.norm import LayerNorm, RMSNorm

    generators: dict[torch.device, torch.Generator | None] = {}
    seen: set[int] = set()  # tied weights are filled once
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen or param.is_meta:
                continue
            seen.add(id(param))
            if isinstance(module, RMSNorm):
                param.fill_(1.0 - module.offset)  # a scale of one, whichever form the norm takes
            elif isinstance(module, LayerNorm) and name == "weight":
                param.fill_(1.0)
            elif name == "bias":
                param.zero_()
            else:
                if param.device not in generators:
                    generators[param.device] = _generator(param.device, seed)
                param.normal_(0.0, DUMMY_INIT_STD, generator=generators[param.device])


def _generator(device: torch.device, seed: int) -> torch.Generator | None:
    try:
        return torch.Generator(device=device).manual_seed(seed)
    except RuntimeError:  # a device without its own generator type: seed the default one instead
        torch.manual_seed(seed)
        return None
