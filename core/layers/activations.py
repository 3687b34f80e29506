"""Feed-forward activations by their config name (`hidden_act`), as transformers computes them.

The common ones are the same PyTorch calls transformers' `ACT2FN` makes, without importing
`transformers.activations`: that import pulls in `torch.distributed.tensor` and sympy (about 0.6 s of
every start). Any other name is transformers' own, imported when a model asks for it.
"""

from __future__ import annotations

import functools

from torch import nn

# transformers' classes for these names call exactly these functions (`SiLUActivation`, `GELUActivation`,
# `GELUTanh`); `tests/foundation/test_activations.py` checks them bit for bit against `ACT2FN`.
_SAME_AS_TRANSFORMERS = {
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,
    "gelu_pytorch_tanh": functools.partial(nn.GELU, approximate="tanh"),
    "relu": nn.ReLU,
}


def activation(name: str) -> nn.Module:
    """The activation module transformers' config name `name` stands for."""
    if name in _SAME_AS_TRANSFORMERS:
        return _SAME_AS_TRANSFORMERS[name]()
    from transformers.activations import ACT2FN

    return ACT2FN[name]
