"""Grammar-constrained decoding: what a request asks for (`GrammarSpec`), compiled off the step loop
(`GrammarCompiler`), and followed token by token (`GrammarMatcher`, `fill_bitmask`).

The library underneath is xgrammar (see the README's "Structured output" for why). Nothing here touches
the logits: each step the engine asks `fill_bitmask` for one int32 bitmask over the whole batch, and the
sampler applies it with the backend's `TokenMask` in one batched operation.
"""

from tokenmill.grammar.compiler import GrammarCompiler, GrammarError, GrammarSpec
from tokenmill.grammar.matcher import GrammarMatcher, fill_bitmask

__all__ = ["GrammarCompiler", "GrammarError", "GrammarMatcher", "GrammarSpec", "fill_bitmask"]
