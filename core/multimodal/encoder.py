"""Image embeddings on the engine side: decode, preprocess with the model's image processor, encode lazily.

A request's images are decoded and preprocessed when it is added (a bad image is a 422 there, not a failed
step). An image is encoded the first time a step feeds one of its tokens; its rows stay with the request
until every one of its tokens is computed, so the later chunks of a chunked prefill slice them, and a
prompt whose image tokens all come from the prefix cache never encodes the image at all.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from tokenmill.errors import ValidationError
from tokenmill.model_runner import StepEmbeddings
from tokenmill.multimodal.inputs import ImageInput, ImageSpan, decode_image, place_images
from tokenmill.request import Request


@dataclass
class RequestImages:
    """One request's images: their preprocessed pixels, and the rows of those encoded and still needed."""

    pixels: list[tuple[torch.Tensor, torch.Tensor]]  # per image: pixel_values, pixel_attention_mask
    rows: dict[int, torch.Tensor] = field(default_factory=dict)  # image index -> (num_tokens, hidden)


class ImageEncoder:
    """The model's `encode_images` behind its image processor; counts the images it encodes."""

    def __init__(self, model: Any, image_processor: Any):
        self.model = model
        self.image_processor = image_processor
        self.num_encoded_images = 0  # images run through the vision encoder since the engine started

    def prepare(self, prompt_token_ids: Sequence[int], images: Sequence[ImageInput]
                ) -> tuple[tuple[ImageSpan, ...], RequestImages]:
        """The images' token positions and pixels; a ValidationError for an image that cannot be read or
        whose tiles do not make the number of tokens the prompt holds for it."""
        spans = place_images(prompt_token_ids, self.model.image_token_id, images)
        pixels = []
        for index, image in enumerate(images):
            values, mask = self._preprocess(image, index)
            tokens = values.shape[0] * self.model.connector_tokens_per_tile
            if tokens != image.num_tokens:
                raise ValidationError(f"image {index} makes {tokens} image tokens here, but the prompt holds "
                                      f"{image.num_tokens} for it: the router's processor differs from the model's")
            pixels.append((values, mask))
        return spans, RequestImages(pixels)

    def _preprocess(self, image: ImageInput, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.image_processor(images=[[decode_image(image.data, index)]], return_tensors="pt")
        values = batch["pixel_values"][0]
        mask = batch["pixel_attention_mask"][0] if "pixel_attention_mask" in batch else torch.ones(
            values.shape[0], *values.shape[2:], dtype=torch.bool)
        real = (values != 0).flatten(1).any(dim=1)  # the processor pads a batch's images to one tile count
        return values[real], mask[real]

    def step_embeddings(self, request: Request, images: RequestImages, start: int, count: int
                        ) -> StepEmbeddings | None:
        """The rows for the image tokens among the `count` tokens fed from position `start`; None if none."""
        offsets, rows = [], []
        for index, span in enumerate(request.images):
            low = bisect.bisect_left(span.positions, start)
            high = bisect.bisect_left(span.positions, start + count)
            if low == high:
                continue
            offsets += [position - start for position in span.positions[low:high]]
            rows.append(self._rows(images, index)[low:high])
        return StepEmbeddings(offsets, torch.cat(rows)) if rows else None

    def _rows(self, images: RequestImages, index: int) -> torch.Tensor:
        if index not in images.rows:
            values, mask = images.pixels[index]
            images.rows[index] = self.model.encode_images(values, mask)
            self.num_encoded_images += 1
        return images.rows[index]

    @staticmethod
    def release_computed(request: Request, images: RequestImages) -> None:
        """Drop the rows of images whose tokens are all computed (a preempted request encodes them again)."""
        for index in [i for i in images.rows if request.images[i].positions[-1] < request.num_computed_tokens]:
            del images.rows[index]
