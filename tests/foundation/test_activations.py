"""tokenmill's activation table rounds exactly as transformers' `ACT2FN`, and start-up never imports it."""

import subprocess
import sys

import pytest
import torch
from transformers.activations import ACT2FN

from tokenmill.layers.activations import _SAME_AS_TRANSFORMERS, activation


@pytest.mark.parametrize("name", sorted(_SAME_AS_TRANSFORMERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_activation_equals_transformers_bit_for_bit(name, dtype):
    x = torch.randn(4, 257, generator=torch.Generator().manual_seed(0)).mul(4).to(dtype)
    assert torch.equal(activation(name)(x), ACT2FN[name](x))


def test_any_other_name_is_transformers_own():
    x = torch.randn(8, 33)
    assert torch.equal(activation("gelu_new")(x), ACT2FN["gelu_new"](x))
    with pytest.raises(KeyError):
        activation("no_such_activation")


def test_building_a_llama_model_leaves_transformers_activations_unimported():
    # Its import costs ~0.6 s of every start (torch.distributed.tensor, sympy): see the module's docstring.
    code = ("import sys, torch\n"
            "from tokenmill.layers.mlp import GatedMLP\n"
            "GatedMLP(8, 16, 'silu', False, torch.float32)\n"
            "print('transformers.activations' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
