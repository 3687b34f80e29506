"""Images in HTTP requests: OpenAI's `image_url` content parts and TGI's markdown `![](url)` in `inputs`.

Data URLs are always read; http(s) URLs are fetched with a size limit and a timeout, unless the server
was started with --disable-image-urls. The model's own processor (transformers) expands each image's
placeholder into its image tokens; each image then travels to the engine as its file and the number of
tokens it took (`tokenmill.multimodal.ImageInput`). A text-only model has no processor here: an image
content part sent to it is refused with a 422 (`chat_template.message_text`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any, Sequence

import httpx

from tokenmill.errors import ValidationError
from tokenmill.multimodal import ImageInput, decode_image

# TGI's markdown image: `![alt](url)`; the url runs to the closing parenthesis (base64 has none).
MARKDOWN_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?:;[\w-]+=[^;,]*)*(?P<b64>;base64)?,(?P<data>.*)", re.S)


@dataclass(frozen=True)
class ImageLimits:
    """How image URLs are read (the router's --disable-image-urls, --image-fetch-timeout, --max-image-bytes)."""

    allow_urls: bool = True
    fetch_timeout_s: float = 10.0
    max_bytes: int = 10_000_000


class ImagePrompts:
    """Prompt text with image placeholders, plus the images' URLs, to token ids and `ImageInput`s."""

    def __init__(self, processor: Any, limits: ImageLimits = ImageLimits()):
        self.processor = processor
        self.limits = limits
        self.placeholder = processor.image_token  # what the chat template writes for an image part ("<image>")

    async def read(self, url: str, where: str) -> bytes:
        """The image file a URL names: a data URL's bytes, or an http(s) URL's body; a 422 naming `where`."""
        if url.startswith("data:"):
            return _data_url_bytes(url, where, self.limits.max_bytes)
        if not url.startswith(("http://", "https://")):
            raise ValidationError(f"{where}: an image URL must be a data URL or an http(s) URL, got "
                                  f"{url[:40]!r}")
        if not self.limits.allow_urls:
            raise ValidationError(f"{where}: this server reads images from data URLs only (it was started with "
                                  "--disable-image-urls); send the image as data:image/...;base64,...")
        return await _fetch(url, where, self.limits)

    async def read_all(self, urls: Sequence[tuple[str, str]]) -> list[bytes]:
        """Each (url, where)'s image, in order."""
        return [await self.read(url, where) for url, where in urls]

    def markdown(self, inputs: str) -> tuple[str, list[tuple[str, str]]]:
        """TGI's `inputs` with each markdown image replaced by the placeholder, and the (url, where) of each."""
        urls: list[tuple[str, str]] = []

        def placeholder(match: re.Match) -> str:
            urls.append((match.group(1), f"`inputs` image {len(urls)}"))
            return self.placeholder

        return MARKDOWN_IMAGE.sub(placeholder, inputs), urls

    async def from_markdown(self, inputs: str, add_special_tokens: bool = True
                            ) -> tuple[list[int] | None, list[ImageInput]]:
        """TGI's `inputs` with its markdown images read and expanded; (None, []) when it has none."""
        text, urls = self.markdown(inputs)
        if not urls:
            return None, []
        return self.encode(text, await self.read_all(urls), add_special_tokens)

    def encode(self, text: str, files: Sequence[bytes], add_special_tokens: bool = True
               ) -> tuple[list[int], list[ImageInput]]:
        """The prompt's token ids, each image expanded as the model's processor does, and the images."""
        if not files:
            return self.processor.tokenizer(text, add_special_tokens=add_special_tokens).input_ids, []
        pictures = [decode_image(data, index) for index, data in enumerate(files)]
        try:
            batch = self.processor(text=text, images=pictures, add_special_tokens=add_special_tokens,
                                   return_text_replacement_offsets=True, return_offsets_mapping=True)
        except ValueError as exc:  # e.g. more placeholders in the text than images
            raise ValidationError(f"the images do not fit the prompt: {exc}") from exc
        ids = list(batch["input_ids"][0])
        characters = batch["offset_mapping"][0]  # each token's (start, end) in the expanded text
        image_token_id = self.processor.image_token_id
        images = []
        for data, replaced in zip(files, batch["text_replacement_offsets"][0]):
            start, end = replaced["new_span"]  # where the processor wrote this image's tokens
            count = sum(1 for token, (first, last) in zip(ids, characters)
                        if token == image_token_id and start <= first and last <= end)
            images.append(ImageInput(data, count))
        return ids, images


def _data_url_bytes(url: str, where: str, max_bytes: int) -> bytes:
    match = DATA_URL.fullmatch(url)
    if match is None or not match.group("b64"):
        raise ValidationError(f"{where}: a data URL must be base64-encoded: data:image/png;base64,...")
    if len(match.group("data")) * 3 // 4 > max_bytes:
        raise ValidationError(f"{where}: the image is larger than the {max_bytes}-byte limit")
    try:
        return base64.b64decode(match.group("data"), validate=True)
    except binascii.Error as exc:
        raise ValidationError(f"{where}: the data URL is not valid base64: {exc}") from exc


async def _fetch(url: str, where: str, limits: ImageLimits) -> bytes:
    """The body of `url`, read up to `limits.max_bytes` within `limits.fetch_timeout_s`."""
    try:
        async with asyncio.timeout(limits.fetch_timeout_s), httpx.AsyncClient(
                timeout=limits.fetch_timeout_s, follow_redirects=True, max_redirects=3) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise ValidationError(f"{where}: fetching the image answered HTTP {response.status_code}")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > limits.max_bytes:
                        raise ValidationError(f"{where}: the image is larger than the {limits.max_bytes}-byte limit")
                return bytes(body)
    except (TimeoutError, httpx.TimeoutException) as exc:
        raise ValidationError(f"{where}: fetching the image took longer than {limits.fetch_timeout_s:g} s") from exc
    except httpx.HTTPError as exc:
        raise ValidationError(f"{where}: the image could not be fetched: {exc}") from exc


