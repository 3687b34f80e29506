"""Tiny random models of architectures tokenmill has no file for: they run on the transformers fallback.

Same sizes as `tests.tiny_models` (hidden 64, 2 layers, the shared vocabulary and tokenizer), each with
what makes its family differ from Llama's: GPT-NeoX's parallel residual and partial rotary, OPT's learned
position embeddings (offset by 2) and LayerNorm.
"""

from __future__ import annotations

import torch
import transformers

from tests.tiny_models import VOCAB, TinyModel

COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=1024, eos_token_id=1, bos_token_id=0, tie_word_embeddings=False)

FALLBACK_FAMILIES = {
    "gpt_neox": ("GPTNeoXConfig", dict(intermediate_size=128, rotary_pct=0.25, use_parallel_residual=True)),
    "opt": ("OPTConfig", dict(ffn_dim=128, word_embed_proj_dim=64, pad_token_id=2)),
    # Its logits are scaled after the head: the fallback refuses it.
    "cohere": ("CohereConfig", dict(intermediate_size=128, num_key_value_heads=2, logit_scale=0.5)),
}


def build_fallback_tiny(name: str, seed: int = 0) -> TinyModel:
    class_name, extra = FALLBACK_FAMILIES[name]
    config = getattr(transformers, class_name)(**{**COMMON, **extra})
    config.architectures = [class_name.replace("Config", "ForCausalLM")]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    return TinyModel(name, config, model)
