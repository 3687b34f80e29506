"""N-gram prompt lookup: the draft is what followed the latest earlier occurrence of the text's last tokens.

Copy-heavy answers (quoting the prompt, editing code, extracting fields) repeat long runs of earlier
tokens; where the last `k` tokens occurred before, the tokens after that occurrence are a cheap guess
of what comes next. No draft model and no weights: verification decides what is kept.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

MAX_NGRAM = 4  # the longest suffix matched; longer ones rarely change the guess and cost a pass each
# The shortest suffix worth a guess. After a lone repeated token (a space, a common word piece) the text
# rarely goes on as it did before: on chat answers of SmolLM2 such drafts were mostly rejected, and a
# rejected draft still makes the step's forward longer (benchmarks/speculation.py, benchmarks.micro.verify_step).
MIN_NGRAM = 2


def propose_ngram(tokens: Sequence[int], num_draft: int, max_ngram: int = MAX_NGRAM,
                  min_ngram: int = MIN_NGRAM) -> list[int]:
    """Up to `num_draft` tokens guessed to follow `tokens`; [] where the last `min_ngram` tokens never
    occurred together before.

    The longest suffix of at most `max_ngram` tokens that occurred earlier wins; among its occurrences
    the latest whose continuation is `num_draft` tokens long, else the earliest (the longest continuation:
    in a short loop the latest one runs into the end of the text).
    """
    seq = np.asarray(tokens, dtype=np.int64)
    n = len(seq)
    if num_draft < 1 or n < 2:
        return []
    ends = np.flatnonzero(seq[:-1] == seq[-1])  # where earlier 1-gram matches end
    matched = 1 if ends.size else 0
    for k in range(2, min(max_ngram, n - 1) + 1):
        # A (k-1)-gram match ending at j extends to a k-gram when the token before it matches too.
        longer = ends[ends >= k - 1]
        longer = longer[seq[longer - (k - 1)] == seq[n - k]]
        if not longer.size:
            break
        ends, matched = longer, k
    if not matched or matched < min_ngram:
        return []
    whole = ends[ends + num_draft <= n - 1]
    start = int(whole[-1] if whole.size else ends[0]) + 1
    return seq[start : start + num_draft].tolist()
