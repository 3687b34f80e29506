"""Grammar-constrained decoding: what a request asks for (`GrammarSpec`), compiled off the step loop
(`GrammarCompiler`), and followed token by token (`GrammarMatcher`, `fill_bitmask`).

The library underneath is xgrammar (see the README's "Structured output" for why). Nothing here touches
the logits: each step the engine asks `fill_bitmask` for one int32 bitmask over the whole batch, and the
sampler applies it with the backend's `TokenMask` in one batched operation.

The package exports the torch-free half only: the router validates and forwards a request's `GrammarSpec`
without importing torch. The matcher, which fills torch tensors, is `tokenmill.grammar.matcher`.
"""

from tokenmill.grammar.compiler import GrammarCompiler, GrammarError, GrammarSpec

__all__ = ["GrammarCompiler", "GrammarError", "GrammarSpec"]
