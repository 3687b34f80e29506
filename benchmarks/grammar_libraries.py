"""xgrammar against llguidance on SmolLM2's tokenizer (49,152 tokens), measured in place: the compile time
of a realistic JSON schema and of "any JSON object", and the per-step time to fill the bitmask of 16
constrained rows and to apply it to (16, 49152) float32 logits. Run: `python -m benchmarks.grammar_libraries`.

Each library's matchers walk the same valid answer token by token (the answer's tokenization by the
model's tokenizer), filling the batch's bitmask at every step. torch runs on one thread.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from tokenmill.interfaces import TokenMask
from tokenmill.loader import load_tokenizer

BATCH = 16
PROFILE = {
    "type": "object", "additionalProperties": False,
    "required": ["name", "age", "role", "tags", "address", "active", "score"],
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {"type": "object", "required": ["city", "zip"], "additionalProperties": False,
                    "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}},
        "active": {"type": "boolean"},
        "score": {"type": "number"},
    },
}
ANSWER = {"name": "Ada Lovelace", "age": 36, "role": "admin", "tags": ["math", "engines"],
          "address": {"city": "London", "zip": "10115"}, "active": True, "score": 9.5}


def _ms(samples: list[float]) -> str:
    samples = sorted(samples)
    return f"p50 {1e3 * statistics.median(samples):.3f} ms, p90 {1e3 * samples[int(0.9 * len(samples))]:.3f} ms"


def _timed(fn, repeat: int = 1) -> tuple[float, object]:
    start = time.perf_counter()
    for _ in range(repeat):
        result = fn()
    return (time.perf_counter() - start) / repeat, result


def bench_xgrammar(tokenizer, vocab: int, answer_ids: list[int], eos: int) -> dict[str, str]:
    import xgrammar as xgr

    setup, info = _timed(lambda: xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=[eos]))
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    text = json.dumps(PROFILE)
    profile_s, compiled = _timed(lambda: compiler.compile_json_schema(text, any_whitespace=False), repeat=5)
    any_s, _ = _timed(lambda: compiler.compile_json_schema('{"type": "object"}', any_whitespace=False), repeat=5)
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(BATCH)]
    bitmask = torch.full((BATCH, (vocab + 31) // 32), -1, dtype=torch.int32)
    fills = []
    for token in answer_ids:
        start = time.perf_counter()
        for row, matcher in enumerate(matchers):
            matcher.fill_next_token_bitmask(bitmask, row)
        fills.append(time.perf_counter() - start)
        for matcher in matchers:
            assert matcher.accept_token(token)
    return {"tokenizer set-up": f"{1e3 * setup:.0f} ms", "compile profile schema": f"{1e3 * profile_s:.1f} ms",
            "compile any JSON object": f"{1e3 * any_s:.1f} ms", "fill 16 rows": _ms(fills)}


def bench_llguidance(tokenizer, vocab: int, answer_ids: list[int]) -> dict[str, str]:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    setup, lltok = _timed(lambda: llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab))
    text = json.dumps(PROFILE)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(text, defaults={"whitespace_flexible": False})
    profile_s, _ = _timed(lambda: llguidance.LLMatcher(lltok, grammar), repeat=5)
    any_grammar = llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}')
    any_s, _ = _timed(lambda: llguidance.LLMatcher(lltok, any_grammar), repeat=5)
    matchers = [llguidance.LLMatcher(lltok, grammar) for _ in range(BATCH)]
    bitmask = llguidance.torch.allocate_token_bitmask(BATCH, vocab)
    fills = []
    for token in answer_ids:
        start = time.perf_counter()
        for row, matcher in enumerate(matchers):
            llguidance.torch.fill_next_token_bitmask(matcher, bitmask, row)
        fills.append(time.perf_counter() - start)
        for matcher in matchers:
            assert matcher.consume_token(token), matcher.get_error()
    return {"tokenizer set-up": f"{1e3 * setup:.0f} ms", "compile profile schema": f"{1e3 * profile_s:.1f} ms",
            "compile any JSON object": f"{1e3 * any_s:.1f} ms", "fill 16 rows": _ms(fills)}


def bench_apply(mask: TokenMask, vocab: int, constrained: int, allowed: str) -> str:
    """`constrained` of the 16 rows masked, the rest all-allowed. `allowed`: "half" (random bits, the worst
    case for a bit loop) or "few" (1% of the words with a random bit pattern, as under a grammar)."""
    logits = torch.randn(BATCH, vocab)
    words = (vocab + 31) // 32
    bitmask = torch.full((BATCH, words), -1, dtype=torch.int32)
    bitmask[:constrained] = torch.randint(-2**31, 2**31 - 1, (constrained, words), dtype=torch.int32)
    if allowed == "few":
        bitmask[:constrained] *= (torch.rand(constrained, words) < 0.01).int()
    samples = [_timed(lambda: mask.apply(logits.clone(), bitmask))[0] for _ in range(50)]
    clones = [_timed(lambda: logits.clone())[0] for _ in range(50)]
    return f"{1e3 * (statistics.median(samples) - statistics.median(clones)):.3f} ms p50"


def main() -> None:
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(None)  # the embedded SmolLM2-135M-Instruct
    vocab, eos = len(tokenizer), tokenizer.convert_tokens_to_ids("<|im_end|>")
    # Without free whitespace, xgrammar writes Python's separators (", ", ": "), llguidance compact ones.
    spaced = tokenizer(json.dumps(ANSWER), add_special_tokens=False).input_ids + [eos]
    compact = tokenizer(json.dumps(ANSWER, separators=(",", ":")), add_special_tokens=False).input_ids + [eos]
    print(f"vocabulary {vocab}, batch {BATCH}, answer {len(spaced)} / {len(compact)} tokens")
    for name, result in (("xgrammar", bench_xgrammar(tokenizer, vocab, spaced, eos)),
                         ("llguidance", bench_llguidance(tokenizer, vocab, compact))):
        print(name, json.dumps(result))
    from tokenmill.plugins.cpu.token_mask import CTokenMask

    for mask in (TokenMask(), CTokenMask()):
        for constrained, allowed in ((BATCH, "few"), (BATCH, "half"), (BATCH // 2, "few")):
            print(f"apply {type(mask).__name__}, {constrained}/{BATCH} rows constrained, {allowed} allowed:",
                  bench_apply(mask, vocab, constrained, allowed))


if __name__ == "__main__":
    main()
