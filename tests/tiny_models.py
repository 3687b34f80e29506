"""The tiny random models live in the conformance package, so vendors' suites build the same ones."""

from tokenmill.conformance.tiny import FAMILIES, VOCAB, TinyModel, build_tiny, char_tokenizer, tiny_tokenizer

__all__ = ["FAMILIES", "VOCAB", "TinyModel", "build_tiny", "char_tokenizer", "tiny_tokenizer"]
