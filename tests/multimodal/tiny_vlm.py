"""A tiny random Idefics3 (SmolVLM's architecture), its processor and transformers' greedy reference."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import transformers
from PIL import Image
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

from tokenmill.conformance.tiny import COMMON, tiny_tokenizer
from tokenmill.loader import Checkpoint

IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
# SmolVLM's template shape: content parts in order, `<image>` for each image part.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}"
                 "{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}"
                 "{% endif %}{% endfor %}{% endif %} <end_of_utterance> {% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")
IMAGE_SIZE = 32  # pixels, one tile: no splitting
IMAGE_SEQ_LEN = 4  # (32 / 8) ** 2 patches, pixel-shuffled by a scale factor of 2


@dataclass
class TinyVLM:
    config: Any
    reference: Any  # transformers' Idefics3ForConditionalGeneration
    processor: Any
    _greedy: dict = field(default_factory=dict)

    def splitting(self) -> "TinyVLM":
        """The same model behind a processor that splits an image into up to 2 x 2 tiles plus the whole
        image as a last tile (SmolVLM's way with large images)."""
        image_processor = Idefics3ImageProcessorPil(do_image_splitting=True, size={"longest_edge": 2 * IMAGE_SIZE},
                                                    max_image_size={"longest_edge": IMAGE_SIZE})
        processor = transformers.Idefics3Processor(image_processor, self.processor.tokenizer,
                                                   image_seq_len=IMAGE_SEQ_LEN, chat_template=CHAT_TEMPLATE)
        return TinyVLM(self.config, self.reference, processor)

    def checkpoint(self) -> Checkpoint:
        tensors = {k: v.clone() for k, v in self.reference.state_dict().items()}
        return Checkpoint(self.config, tensors, self.processor.tokenizer, "tiny-idefics3", "safetensors", (1,),
                          processor=self.processor)

    def greedy(self, text: str, images: Sequence[bytes], max_new_tokens: int) -> tuple[list[int], list[int]]:
        """The prompt's token ids and transformers' greedy continuation of it, never stopping early
        (remembered: several tests ask for the same case)."""
        key = (text, tuple(images), max_new_tokens)
        if key not in self._greedy:
            self._greedy[key] = self._generate(text, images, max_new_tokens)
        return self._greedy[key]

    def _generate(self, text: str, images: Sequence[bytes], max_new_tokens: int) -> tuple[list[int], list[int]]:
        pictures = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
        inputs = self.processor(text=text, images=pictures or None, return_tensors="pt")
        out = self.reference.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                                      pad_token_id=0, min_new_tokens=max_new_tokens)
        prompt = inputs["input_ids"][0].tolist()
        return prompt, out[0, len(prompt):].tolist()


def build_tiny_vlm(seed: int = 0) -> TinyVLM:
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": IMAGE_TOKENS})
    tokenizer.chat_template = CHAT_TEMPLATE
    text_config = transformers.LlamaConfig(**{**COMMON, "vocab_size": len(tokenizer)})
    vision_config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         image_size=IMAGE_SIZE, patch_size=8)
    config = transformers.Idefics3Config(text_config=text_config.to_dict(), vision_config=vision_config,
                                         scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    config.architectures = ["Idefics3ForConditionalGeneration"]
    torch.manual_seed(seed)
    reference = transformers.Idefics3ForConditionalGeneration._from_config(
        config, dtype=torch.float32, attn_implementation="eager").eval()
    image_processor = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": IMAGE_SIZE},
                                                max_image_size={"longest_edge": IMAGE_SIZE})
    processor = transformers.Idefics3Processor(image_processor, tokenizer, image_seq_len=IMAGE_SEQ_LEN,
                                               chat_template=CHAT_TEMPLATE)
    return TinyVLM(config, reference, processor)


def png(seed: int, size: tuple[int, int] = (24, 40)) -> bytes:
    """A random RGB picture as PNG bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
