"""Idefics3 / SmolVLM in the engine: greedy output equals transformers' with images, chunked or not, and the
prefix cache keys image blocks by the image's content."""

from __future__ import annotations

import pytest

from tests.multimodal.tiny_vlm import build_tiny_vlm, png
from tokenmill.engine import Engine, EngineConfig
from tokenmill.errors import ValidationError
from tokenmill.multimodal import ImageInput
from tokenmill.sampling_params import SamplingParams

MAX_NEW = 6
# 37 tokens: the first image in the first KV block of 16, the second in the next; both blocks can be shared.
TWO_IMAGES = "w5 w6 w7 w8 <image> w9 w20 w21 w22 w23 w24 w25 w26 w27 <image> w28 w29 w30 w31 w32 w33 w34 w35 w36 w37"
ONE_IMAGE = "w40 w41 <image> w42 w43 w44"


@pytest.fixture(scope="module")
def vlm():
    return build_tiny_vlm()


def _engine(vlm, **overrides) -> Engine:
    config = EngineConfig(backend="cpu", dtype="float32", kv_cache_bytes=4 << 20, progress=False, **overrides)
    return Engine(config, checkpoint=vlm.checkpoint())


@pytest.fixture(scope="module")
def engine(vlm):
    return _engine(vlm)


def _images(pictures: list[bytes], per_image: int = 4) -> list[ImageInput]:
    return [ImageInput(data, per_image) for data in pictures]


def _tokens(outputs) -> list[int]:
    return [token.id for out in outputs for token in out.new_tokens]


def _run(engine: Engine, cases: list[tuple[str, list[bytes]]], vlm) -> tuple[list[list[int]], list[list[int]]]:
    references = [vlm.greedy(text, pictures, MAX_NEW) for text, pictures in cases]
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    outputs = engine.generate([prompt for prompt, _ in references], params,
                              images=[_images(pictures) for _, pictures in cases])
    return [_tokens(out) for out in outputs], [expected for _, expected in references]


def test_one_and_two_images_and_text_batched_match_transformers(engine, vlm) -> None:
    cases = [(TWO_IMAGES, [png(1), png(2)]), (ONE_IMAGE, [png(3, (50, 30))]), ("w7 w8 w9", [])]
    got, expected = _run(engine, cases, vlm)
    assert got == expected


def test_a_prefill_chunk_may_cut_through_an_image(vlm) -> None:
    chunked = _engine(vlm, max_num_batched_tokens=5)  # every image's 7 tokens span two chunks or more
    got, expected = _run(chunked, [(TWO_IMAGES, [png(1), png(2)]), (ONE_IMAGE, [png(3)])], vlm)
    assert got == expected


def test_images_split_into_tiles_match_transformers(vlm) -> None:
    from tokenmill.api.images import ImagePrompts

    splitting = vlm.splitting()
    engine = _engine(splitting, max_num_batched_tokens=16)
    pictures = [png(1, (40, 64)), png(2, (20, 20))]
    ids, images = ImagePrompts(splitting.processor).encode(ONE_IMAGE.replace("w44", "<image>"), pictures)
    prompt, expected = splitting.greedy(ONE_IMAGE.replace("w44", "<image>"), pictures, MAX_NEW)
    assert ids == prompt and [image.num_tokens for image in images] == [20, 20]  # (2 x 2 + 1) tiles of 4
    outputs = engine.generate([ids], SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True), images=[images])
    assert _tokens(outputs[0]) == expected


def test_the_prefix_cache_keys_image_blocks_by_content(vlm) -> None:
    engine = _engine(vlm)
    first, _ = _run(engine, [(TWO_IMAGES, [png(1), png(2)])], vlm)
    assert engine.image_encoder.num_encoded_images == 2
    # The same images again: their blocks come from the cache, and neither image is encoded again.
    again, expected = _run(engine, [(TWO_IMAGES, [png(1), png(2)])], vlm)
    assert again == expected == first
    assert engine.image_encoder.num_encoded_images == 2 and engine.block_manager.prefix_hits > 0
    # Another second image: the same token ids, but blocks from its first token on must not be shared.
    other, expected = _run(engine, [(TWO_IMAGES, [png(1), png(5)])], vlm)
    assert other == expected != first
    assert engine.image_encoder.num_encoded_images == 3  # the first image's blocks were still shared


def test_images_that_do_not_match_the_prompt_are_refused(engine, vlm) -> None:
    prompt, _ = vlm.greedy(ONE_IMAGE, [png(1)], 1)
    params = SamplingParams(max_new_tokens=2)
    with pytest.raises(ValidationError, match="image tokens"):
        engine.add_request("too-many", prompt, params, images=_images([png(1), png(2)]))
    with pytest.raises(ValidationError, match="image tokens"):  # an image token typed as text, no image
        engine.add_request("no-image", prompt, params)
    with pytest.raises(ValidationError, match="cannot be read as an image"):
        engine.add_request("not-an-image", prompt, params, images=[ImageInput(b"GIF89a", 4)])
    assert not engine.has_unfinished()
