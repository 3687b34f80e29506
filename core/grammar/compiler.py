"""What a request's output must match, and its compilation on a thread pool, cached by the grammar's text."""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Collection

from tokenmill.errors import ValidationError

KINDS = ("json", "json_object", "regex", "ebnf", "choice")


class GrammarError(ValidationError):
    """A grammar that cannot be compiled; the message carries the compiler's (HTTP 422)."""


@dataclass(frozen=True)
class GrammarSpec:
    """A constraint on a request's output, as text (its cache key).

    kind: `json` (value: a JSON schema, as JSON text), `json_object` (any JSON object; value unused),
    `regex`, `ebnf` (xgrammar's EBNF, the GBNF dialect vLLM's `guided_grammar` takes) or `choice`
    (value: a JSON list of strings, one of which the output is exactly).
    """

    kind: str
    value: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValidationError(f"grammar kind must be one of {', '.join(KINDS)}. Given: {self.kind!r}")

    @classmethod
    def json_schema(cls, schema: Any) -> "GrammarSpec":
        """From a schema given as an object or as JSON text (TGI and vLLM take both)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise GrammarError(f"the JSON schema is not valid JSON: {exc}") from None
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"a JSON schema is an object. Given: {type(schema).__name__}")
        # Key order is kept: a schema's property order is the order of the generated object's keys
        # (OpenAI's strict mode writes properties as declared), so two orders are two grammars.
        return cls("json", json.dumps(schema))

    @classmethod
    def choice(cls, options: Collection[str]) -> "GrammarSpec":
        options = list(options)
        if not options or not all(isinstance(o, str) and o for o in options):
            raise GrammarError("a choice is a non-empty list of non-empty strings")
        return cls("choice", json.dumps(options))


class GrammarCompiler:
    """Compiles `GrammarSpec`s for one tokenizer on a thread pool; each text is compiled once.

    `submit` returns at once with a future, shared by every request with the same grammar; the engine's
    step loop never waits on a compilation. `make_tokenizer_info` builds xgrammar's view of the
    vocabulary (a few hundred ms for a real tokenizer), on the pool, the first time it is needed.
    """

    def __init__(self, make_tokenizer_info: Callable[[], Any], max_workers: int = 2, cache_size: int = 256,
                 any_whitespace: bool = False):
        self._make_tokenizer_info = make_tokenizer_info
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="tokenmill-grammar")
        self._lock = threading.Lock()
        self._cache: OrderedDict[GrammarSpec, Future] = OrderedDict()
        self._cache_size = cache_size
        # Compact JSON by default: with free whitespace, small models can loop on newlines until max tokens.
        self._any_whitespace = any_whitespace
        self._compiler = None
        self._compiler_lock = threading.Lock()

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, vocab_size: int, stop_token_ids: Collection[int],
                      **kwargs: Any) -> "GrammarCompiler":
        """A compiler for a transformers tokenizer whose model has `vocab_size` logits."""
        def tokenizer_info():
            xgrammar = _import_xgrammar()

            return xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                           stop_token_ids=sorted(stop_token_ids))
        return cls(tokenizer_info, **kwargs)

    def submit(self, spec: GrammarSpec) -> Future:
        """The compiled grammar, or a `GrammarError`, as a future."""
        with self._lock:
            future = self._cache.get(spec)
            if future is None:
                future = self._cache[spec] = self._pool.submit(self._compile, spec)
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(spec)
            return future

    def compile(self, spec: GrammarSpec) -> Any:
        """`submit` and wait: for callers off the step loop (tests, benchmarks)."""
        return self.submit(spec).result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _xgrammar(self) -> Any:
        with self._compiler_lock:
            if self._compiler is None:
                xgrammar = _import_xgrammar()

                self._compiler = xgrammar.GrammarCompiler(self._make_tokenizer_info(), max_threads=1)
            return self._compiler

    def _compile(self, spec: GrammarSpec) -> Any:
        compiler = self._xgrammar()
        try:
            if spec.kind == "json":
                return compiler.compile_json_schema(spec.value, any_whitespace=self._any_whitespace)
            if spec.kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=self._any_whitespace)
            if spec.kind == "regex":
                return compiler.compile_regex(spec.value)
            if spec.kind == "choice":
                # EBNF string literals take JSON's escapes, so each option is its own JSON string.
                options = " | ".join(json.dumps(o, ensure_ascii=False) for o in json.loads(spec.value))
                return compiler.compile_grammar(f"root ::= {options}")
            return compiler.compile_grammar(spec.value)
        except Exception as exc:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError with the reason
            # xgrammar prefixes its C++ messages with a time and a source location.
            reason = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(exc).strip())
            raise GrammarError(f"the {spec.kind} grammar could not be compiled: {reason}") from None


def _import_xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise GrammarError("structured output needs xgrammar, which is not installed on this server "
                           "(pip install 'tokenmill[grammar]')") from None
    return xgrammar
