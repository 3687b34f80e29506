"""An image as a request carries it, and where its tokens sit in the prompt (no torch: the router uses it too)."""

from __future__ import annotations

import functools
import hashlib
import io
from dataclasses import dataclass
from typing import Any, Sequence

from tokenmill.errors import ValidationError


@dataclass(frozen=True)
class ImageInput:
    """One image of a prompt: the encoded file as sent (PNG, JPEG, ...) and how many image tokens the
    model's processor expanded it to (several tiles each of `image_seq_len` tokens when it splits images)."""

    data: bytes
    num_tokens: int

    @functools.cached_property
    def content_hash(self) -> bytes:
        """What the prefix cache keys the image by: a cryptographic digest, as for token blocks."""
        return hashlib.blake2b(self.data, digest_size=16).digest()


@dataclass(frozen=True)
class ImageSpan:
    """An image and the prompt positions of its image tokens, in order (its embedding rows go there)."""

    image: ImageInput
    positions: tuple[int, ...]


def place_images(token_ids: Sequence[int], image_token_id: int, images: Sequence[ImageInput]) -> tuple[ImageSpan, ...]:
    """Each image's token positions: the prompt's image tokens, taken in order, `num_tokens` for each image.

    A prompt whose image tokens are not exactly the images' (an `<image>` typed as text, say) is refused."""
    positions = [index for index, token in enumerate(token_ids) if token == image_token_id]
    expected = sum(image.num_tokens for image in images)
    if len(positions) != expected:
        raise ValidationError(f"the prompt holds {len(positions)} image tokens, but its {len(images)} image(s) "
                              f"take {expected}: each image goes where its own placeholder is, and the text "
                              "must not contain image tokens of its own")
    spans, start = [], 0
    for image in images:
        spans.append(ImageSpan(image, tuple(positions[start : start + image.num_tokens])))
        start += image.num_tokens
    return tuple(spans)


def image_block_keys(spans: Sequence[ImageSpan]) -> tuple[tuple[int, bytes], ...]:
    """(position of the first image token, content hash) of each image: the block holding that position
    hashes the image's content with its tokens, and every later block chains from that block's hash."""
    return tuple((span.positions[0], span.image.content_hash) for span in spans if span.positions)


def decode_image(data: bytes, index: int) -> Any:
    """The PIL image (RGB) of an image file; a ValidationError naming image `index` if it is not one."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(io.BytesIO(data)).convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValidationError(f"image {index} cannot be read as an image: {exc}") from exc
