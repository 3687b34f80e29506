"""A tiny random Llama taught, by a few hundred steps of gradient descent, to answer one prompt with one
text: a real model whose greedy answer is known, for end-to-end tests of what the server makes of it."""

from __future__ import annotations

import torch

from tests.tiny_models import TinyModel, build_tiny


def taught_tiny(prompt_ids: list[int], answer_ids: list[int], steps: int = 120) -> TinyModel:
    """A tiny Llama whose greedy continuation of `prompt_ids` is `answer_ids` (end it with EOS to stop there)."""
    tiny = build_tiny("llama")
    model = tiny.reference.train()
    ids = torch.tensor([prompt_ids + answer_ids])
    labels = torch.tensor([[-100] * len(prompt_ids) + answer_ids])  # the loss is on the answer only
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains ten times faster on one thread than on two busy ones
    try:
        torch.manual_seed(0)
        for _ in range(steps):
            loss = model(input_ids=ids, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    learnt = tiny.greedy(prompt_ids, len(answer_ids))
    assert learnt == answer_ids, f"not learnt in {steps} steps (loss {loss.item():.4f})"
    return tiny
