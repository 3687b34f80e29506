"""The embedded SmolLM2 is a text-only model: an image sent to it is refused with a 422, never dropped."""

from __future__ import annotations

import base64

import httpx
import pytest

from tests.multimodal.tiny_vlm import png

pytestmark = pytest.mark.slow


def test_an_image_part_sent_to_smollm2_is_a_422_naming_it(served_smollm2) -> None:
    image = "data:image/png;base64," + base64.b64encode(png(3)).decode()
    body = {"model": "tgi", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"}, {"type": "image_url", "image_url": {"url": image}}]}]}
    response = httpx.post(f"{served_smollm2}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 422
    error = response.json()["error"]
    assert "text-only" in error and "messages[0].content[1]" in error
