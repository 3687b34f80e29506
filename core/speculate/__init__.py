"""Speculative decoding: guess a few tokens per decoding sequence, verify them all in one forward.

Each step, a running sequence may carry a draft (`Request.draft_token_ids`) proposed after the previous
step (`ngram.propose_ngram`: prompt lookup, TGI's `--speculate N`). The scheduler feeds the sequence's
last token and its draft as one multi-token query over its paged cache, the same case as a prompt
chunk with earlier context; the model returns logits for every fed position. `verify.Verification`
samples each position as if the draft before it had been accepted, keeps the draft tokens the model
would have produced itself and the token after them, and the scheduler rolls the rest back.
"""

from tokenmill.speculate.ngram import propose_ngram
from tokenmill.speculate.speculator import NgramSpeculator, SpeculationStats
from tokenmill.speculate.verify import Verification

__all__ = ["NgramSpeculator", "SpeculationStats", "Verification", "propose_ngram"]
