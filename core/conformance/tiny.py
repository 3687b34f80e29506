"""Tiny random-weight models of every supported family, built on the spot (no download).

Each comes with the transformers reference model (float32, eager attention) and a word-level
tokenizer over the same vocabulary, so the engine can run end to end without any download.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from tokenmill.loader import Checkpoint

VOCAB = 256

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=1, bos_token_id=0,
              tie_word_embeddings=False)

FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "llama_tied": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(sliding_window=24)),
    "qwen2": ("Qwen2Config", dict()),
    "qwen3": ("Qwen3Config", dict(head_dim=32)),
    "phi3": ("Phi3Config", dict(pad_token_id=2, sliding_window=None)),
    # Mixture of experts: top-2 routing; Qwen2-MoE's norm_topk_prob is False, its layer 0 dense (mlp_only_layers).
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=96, norm_topk_prob=False,
                                         mlp_only_layers=[0])),
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                         norm_topk_prob=True)),
    # Windows of 8 tokens, so most test prompts cross them. Gemma 2's weights are drawn 5x wider, so its
    # attention is sharp enough for the score cap to change which tokens it attends to; both caps are low
    # enough for tanh to bend (at Gemma 2's own 50 and 30 they would be the identity on a tiny model).
    "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=24, initializer_range=0.1,
                                    attn_logit_softcapping=1.0, final_logit_softcapping=3.0,
                                    tie_word_embeddings=True)),
    "gemma3": ("Gemma3TextConfig", dict(
        head_dim=16, sliding_window=8, query_pre_attn_scalar=12, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000.0}})),
    "granite": ("GraniteConfig", dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.1,
                                      logits_scaling=8.0, attention_bias=True, mlp_bias=True)),
    "starcoder2": ("Starcoder2Config", dict(sliding_window=8, tie_word_embeddings=True)),
    "phi": ("PhiConfig", dict(partial_rotary_factor=0.5)),
    # RoPE scalings, with contexts short enough that the tests' prompts and continuations cross them, and
    # weights large enough that attention depends on positions (at 0.02, greedy tokens ignore RoPE).
    "qwen2_yarn": ("Qwen2Config", dict(initializer_range=0.2, max_position_embeddings=32, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})),
    "llama_dynamic": ("LlamaConfig", dict(initializer_range=0.2, max_position_embeddings=32, rope_scaling={
        "rope_type": "dynamic", "factor": 4.0})),
    "phi3_longrope": ("Phi3Config", dict(
        initializer_range=0.2, pad_token_id=2, sliding_window=None, max_position_embeddings=128,
        original_max_position_embeddings=32, rope_scaling={
            "rope_type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.5, 2.0, 3.0, 4.0, 5.0],
            "long_factor": [1.0, 1.5, 2.0, 4.0, 6.0, 8.0, 12.0, 16.0]})),
}

# Architectures whose name is not the config's with "ForCausalLM" for "Config".
ARCHITECTURES = {"Gemma3TextConfig": "Gemma3ForCausalLM"}

# Families whose biases and norm weights transformers starts at constants (zeros, ones): the tiny models
# get random ones instead, which a bias or norm loaded wrongly, dropped or added twice would change.
PERTURBED = {"gemma2", "gemma3", "granite", "starcoder2", "phi"}


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {f"w{i}": i for i in range(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="w0", eos_token="w1",
                                                unk_token="w3")


def char_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A character-level tokenizer over the same `VOCAB` ids, for text with structure (JSON, regexes).

    Ids 0-2 are BOS, EOS (as the tiny configs say) and UNK; then printable ASCII, one character a token;
    the rest are multi-character tokens (JSON punctuation, words, digit pairs), so that, as with a real
    vocabulary, one text has several tokenizations. Encoding splits into characters; decoding joins tokens.
    """
    tokens = ["<s>", "</s>", "<unk>"] + [chr(c) for c in range(32, 127)]
    tokens += ['{"', '":', '",', '"}', '":"', '", "', ': ', ', ', 'true', 'false', 'null', 'yes', 'no', 'name',
               'age', 'ok', 'abc', 'ab', 'ba', 'cc', '[]', '{}']
    tokens += [f"{i:02d}" for i in range(100)]
    tokens += [a + b for a in "aeiuy" for b in "nrstlmdkp"][: VOCAB - len(tokens)]
    assert len(tokens) == VOCAB, len(tokens)
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")


@dataclass
class TinyModel:
    name: str
    config: Any
    reference: Any  # the transformers model

    def checkpoint(self) -> Checkpoint:
        tensors = {k: v.clone() for k, v in self.reference.state_dict().items()}
        return Checkpoint(self.config, tensors, tiny_tokenizer(), f"tiny-{self.name}", "safetensors", (1,))

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        """transformers' greedy continuation, never stopping early, as if the model were fresh."""
        # transformers' dynamic RoPE keeps the longest length it has seen and resets on a sequence
        # shorter than the model's context: one short forward gives this prompt a fresh start.
        self.reference(torch.tensor([[0]]))
        out = self.reference.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                                      eos_token_id=None, pad_token_id=0, min_new_tokens=max_new_tokens)
        return out[0, len(prompt):].tolist()


def build_tiny(name: str, seed: int = 0, **overrides: Any) -> TinyModel:
    class_name, extra = FAMILIES[name]
    config = getattr(transformers, class_name)(**{**COMMON, **extra, **overrides})
    config.architectures = [ARCHITECTURES.get(class_name, class_name.replace("Config", "ForCausalLM"))]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    if name in PERTURBED:
        perturb_constant_parameters(model, seed)
    return TinyModel(name, config, model)


@torch.no_grad()
def perturb_constant_parameters(model: Any, seed: int) -> None:
    """Random offsets on the biases and norm weights transformers starts at constants (see PERTURBED)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("bias") or "norm" in name:
            param.add_(torch.randn(param.shape, generator=generator) * 0.2)
