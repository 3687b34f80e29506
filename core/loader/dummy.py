"""`--load-format dummy`: a model of a real shape with random weights, for benchmarks without weight files.

The model id names a folder with a `config.json` (tokenizer files optional) or a built-in shape
(`BUILTIN_SHAPES`). No weight file is read: the engine builds the model on its device and fills the
parameters there, in the model dtype, from a fixed seed (`build_dummy_model`, in `dummy_weights`), so an
8B model never passes through host memory.

Tokenizer: a folder's own tokenizer files when it has them; otherwise (and always for a built-in
shape) an *id tokenizer* (`id_tokenizer`): one word per token id, `t0` ... `t{vocab_size-1}`,
split on whitespace, every other word read as the unknown token. Its vocabulary is the config's, so
every id a random model samples decodes, and a prompt of N words is N tokens. Text in and out carries
no meaning: with random weights it never could.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenmill.loader.errors import ModelNotFoundError, UnsupportedCheckpointError

LOAD_FORMATS = ("auto", "dummy")

# Exact configs of well-known models, by the name `--model-id` takes with `--load-format dummy`.
BUILTIN_SHAPES: dict[str, dict[str, Any]] = {
    "llama-3-8b": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
        rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192, bos_token_id=128000,
        eos_token_id=128001, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        hidden_act="silu", torch_dtype="bfloat16",
    ),
    # Llama-3.2-1B-Instruct's config: 1.24 B parameters, the head tied to the embeddings.
    "llama-3.2-1b": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=2048, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, intermediate_size=8192, vocab_size=128256,
        rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                               high_freq_factor=4.0, original_max_position_embeddings=8192),
        rms_norm_eps=1e-5, max_position_embeddings=131072, bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009], tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
        hidden_act="silu", torch_dtype="bfloat16",
    ),
}

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def dummy_config(model_id: str | None) -> tuple[Any, Path | None]:
    """The transformers config for `model_id`, and its folder (None for a built-in shape)."""
    from transformers import AutoConfig, LlamaConfig

    path = Path(model_id).expanduser() if model_id else None
    if path is not None and path.is_dir():
        if not (path / "config.json").exists():
            raise UnsupportedCheckpointError(f"--load-format dummy: {path} has no config.json")
        return AutoConfig.from_pretrained(str(path)), path
    if model_id in BUILTIN_SHAPES:
        return LlamaConfig(**BUILTIN_SHAPES[model_id]), None
    raise ModelNotFoundError(
        f"--load-format dummy needs --model-id to name a folder with a config.json or a built-in shape "
        f"({', '.join(sorted(BUILTIN_SHAPES))}); got {model_id!r}"
    )


def id_tokenizer(vocab_size: int, bos_token_id: int | None = None, eos_token_id: Any = None) -> Any:
    """A tokenizer whose words are the token ids themselves (`t0` ... `t{vocab_size-1}`); see the module doc."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins the words with spaces
    eos = eos_token_id[0] if isinstance(eos_token_id, (list, tuple)) else eos_token_id
    specials = {"unk_token": "t0"}
    if bos_token_id is not None:
        specials["bos_token"] = f"t{bos_token_id}"
    if eos is not None:
        specials["eos_token"] = f"t{eos}"
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


def dummy_tokenizer(model_id: str | None) -> Any:
    """The tokenizer a dummy model of `model_id` serves with (the router needs only this)."""
    config, folder = dummy_config(model_id)
    if folder is not None and any((folder / name).exists() for name in _TOKENIZER_FILES):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder))
    return id_tokenizer(config.vocab_size, getattr(config, "bos_token_id", None),
                        getattr(config, "eos_token_id", None))


def load_dummy_checkpoint(model_id: str | None, dtype: Any) -> Any:
    """A `Checkpoint` with the config and tokenizer of `model_id` and no tensors (format "dummy")."""
    from tokenmill.loader.checkpoint import Checkpoint

    config, _ = dummy_config(model_id)
    eos = getattr(config, "eos_token_id", None)
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    return Checkpoint(config, {}, dummy_tokenizer(model_id), str(model_id), "dummy", eos_ids)
