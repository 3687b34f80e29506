"""Streaming text out of token ids: incremental decoding and stop strings across token boundaries."""

from __future__ import annotations

from typing import Any, Sequence

REPLACEMENT = "\ufffd"


class TokenDecoder:
    """A tokenizer's decode for the per-token path, straight to its Rust `tokenizers.Tokenizer` where it has one.

    transformers' `decode` normalises its arguments around that call: ~2.7 us a call against ~0.5 us for the
    call itself (SmolLM2's tokenizer), and a streamed token takes three decodes and a look-up of the special
    ids (~2.9 us, a list rebuilt at every access), all on the engine thread between steps. The text is the
    same: transformers' fast `_decode` makes this very call and then only cleans up spaces, which is done
    here by the tokenizer's own decode wherever it would happen.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        self._backend = backend if type(backend).__module__.startswith("tokenizers") else None
        self._cleans_up = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self.special_ids = frozenset(tokenizer.all_special_ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        """`ids`' text, spaces left as they are."""
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)

    def token_text(self, token: int) -> str:
        """One token's text as `tokenizer.decode([token])` gives it (special tokens kept, the tokenizer's clean-up)."""
        if self._backend is not None and not self._cleans_up:
            return self._backend.decode([token], skip_special_tokens=False)
        return self.tokenizer.decode([token])


class IncrementalDetokenizer:
    """Text deltas for tokens appended one at a time, never splitting a multi-byte character.

    Decodes a short window (from `prefix_offset`) twice per token, as TGI and vLLM do: the window's
    text without and with the new tokens; the difference is the delta, held back while it ends in an
    incomplete character (U+FFFD), e.g. between the byte-fallback tokens of one emoji.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], skip_special_tokens: bool = True):
        """`tokenizer`: a transformers tokenizer, or the engine's `TokenDecoder` of one (shared by its requests)."""
        self.decoder = tokenizer if isinstance(tokenizer, TokenDecoder) else TokenDecoder(tokenizer)
        self.skip_special_tokens = skip_special_tokens
        # Start from the prompt's tail, so the first generated token decodes with its left context
        # (sentencepiece drops a leading space at the start of a decode).
        self.ids: list[int] = list(prompt_ids[-6:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def _decode(self, ids: Sequence[int]) -> str:
        return self.decoder.decode(ids, self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        if len(full_text) > len(prefix_text) and not full_text.endswith(REPLACEMENT):
            delta = full_text[len(prefix_text) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""


class StopChecker:
    """Finds stop strings in streamed text, even split across deltas, and holds back what might start one.

    `add(delta)` returns the text safe to emit now and whether a stop string ended generation; the
    final text keeps the stop string when `include_stop` (TGI) and drops it otherwise (OpenAI). With
    `check=False` (a request short of its `min_tokens`) the text is taken without looking for stops;
    a later check finds a stop string that ends in its own delta, even one that began before.
    """

    def __init__(self, stops: Sequence[str], include_stop: bool):
        self.stops = [s for s in stops if s]
        self.include_stop = include_stop
        self.text = ""
        self.emitted = 0
        self.stopped_by: str | None = None
        self._max_len = max((len(s) for s in self.stops), default=0)

    def add(self, delta: str, check: bool = True) -> tuple[str, bool]:
        if self.stopped_by is not None:
            return "", True
        start = max(0, len(self.text) - self._max_len + 1)
        self.text += delta
        if not self.stops:
            return self._emit(len(self.text)), False
        if not check:
            return self._emit(len(self.text) - self._held_back()), False
        found = [(self.text.find(s, start), s) for s in self.stops]
        found = [(i, s) for i, s in found if i >= 0]
        if found:
            # The stop that *ends* first, so the outcome does not depend on how the text was chunked.
            index, stop = min(found, key=lambda item: (item[0] + len(item[1]), item[0]))
            self.stopped_by = stop
            self.text = self.text[: index + len(stop)] if self.include_stop else self.text[:index]
            return self._emit(len(self.text)), True
        return self._emit(len(self.text) - self._held_back()), False

    def flush(self) -> str:
        """Everything still held back, at the end of generation."""
        return self._emit(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        for length in range(min(self._max_len - 1, len(self.text)), 0, -1):
            tail = self.text[-length:]
            if any(s.startswith(tail) for s in self.stops):
                return length
        return 0

    def _emit(self, end: int) -> str:
        end = max(end, self.emitted)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
