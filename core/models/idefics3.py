"""SmolVLM / Idefics3: a SigLIP-style vision encoder and a pixel-shuffle connector in front of a Llama.

The language model is tokenmill's own Llama (paged, on flattened batches), built from the config's
`text_config`; image embeddings replace the embeddings of the image tokens before its first layer
(`LlamaForCausalLM.forward`'s `input_embeddings`). The vision encoder and the connector are transformers'
own modules: they run once per image (`encode_images`), not per generated token.
"""

from __future__ import annotations

from typing import Any

import torch

from tokenmill.errors import ValidationError
from tokenmill.models.llama import LlamaForCausalLM, MakeAttention
from tokenmill.parallel import SINGLE_RANK, ParallelContext


class Idefics3ForConditionalGeneration(LlamaForCausalLM):
    """The Llama of `config.text_config`, plus `vision_model` and `connector` for `encode_images`."""

    subclass_loaded_prefixes = ("vision_model.", "connector.")

    def __init__(self, config: Any, make_attention: MakeAttention, dtype: torch.dtype,
                 parallel: ParallelContext = SINGLE_RANK):
        from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector, Idefics3VisionTransformer

        if parallel.is_parallel:
            raise ValidationError("Idefics3 / SmolVLM runs on one shard: start it without --num-shard")
        super().__init__(config.text_config, make_attention, dtype, parallel)
        self.vision_config = config.vision_config
        self.image_token_id = config.image_token_id
        patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
        self.connector_tokens_per_tile = patches // config.scale_factor**2  # the processor's image_seq_len
        self.vision_model = Idefics3VisionTransformer(config.vision_config).to(dtype)
        self.connector = Idefics3Connector(config).to(dtype)

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor) -> torch.Tensor:
        """Embedding rows (tiles x image_seq_len, hidden) of one image's tiles, in prompt order.

        `pixel_values` (tiles, 3, H, W) and `pixel_attention_mask` (tiles, H, W) as the model's image processor
        makes them; all-zero tiles (the processor's padding) are dropped, as transformers drops them."""
        parameter = self.connector.modality_projection.proj.weight
        pixel_values = pixel_values.to(parameter.device, parameter.dtype)
        real = (pixel_values != 0).flatten(1).any(dim=1)
        pixel_values, mask = pixel_values[real], pixel_attention_mask.to(parameter.device)[real].bool()
        size = self.vision_config.patch_size
        patches = mask.unfold(1, size, size).unfold(2, size, size)
        patch_attention_mask = patches.sum(dim=(-1, -2)) > 0
        hidden = self.vision_model(pixel_values=pixel_values, patch_attention_mask=patch_attention_mask).last_hidden_state
        features = self.connector(hidden)  # (tiles, image_seq_len, hidden)
        return features.reshape(-1, features.shape[-1])

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """transformers' names: `model.vision_model.*`, `model.connector.*`, `model.text_model.*`, `lm_head.*`."""
        vision, text = {}, {}
        for name, tensor in tensors.items():
            local = name.removeprefix("model.")
            if local.startswith(self.subclass_loaded_prefixes):
                vision[local] = tensor
            else:
                text[name.replace("model.text_model.", "model.", 1)] = tensor
        for prefix in self.subclass_loaded_prefixes:
            module = getattr(self, prefix.rstrip("."))
            own = {k.removeprefix(prefix): v for k, v in vision.items() if k.startswith(prefix)}
            module.load_state_dict(own, strict=True)
        super().load_weights(text)
