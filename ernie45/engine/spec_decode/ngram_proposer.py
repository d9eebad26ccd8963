"""N-gram (prompt lookup) drafting: the k tokens that followed the most recent earlier occurrence of the sequence's
last n tokens, trying n from prompt_lookup_max down to prompt_lookup_min (vLLM's NgramProposer rule), with one
refinement: when the latest occurrence is too close to the end to be followed by k tokens (a loop: "a b a b"), the
latest one that is followed by k tokens is taken instead, so loops draft k tokens rather than one. Repetitive
work (editing or quoting a given text, code) is where it drafts well; elsewhere it finds no match and drafts
nothing, which costs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def propose_ngram(token_ids: Sequence[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k draft tokens continuing `token_ids` (empty when no n-gram of the tail occurs earlier)."""
    ids = np.asarray(token_ids, dtype=np.int64)
    total = len(ids)
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        # Starts s in [0, total - n - 1] where ids[s : s + n] equals the last n tokens: n vectorised comparisons.
        last_start = total - n - 1
        match = ids[: last_start + 1] == ids[total - n]
        for j in range(1, n):
            match &= ids[j : last_start + 1 + j] == ids[total - n + j]
        starts = np.flatnonzero(match)
        if starts.size == 0:
            continue
        full = starts[starts <= total - n - k]  # followed by k tokens
        start = int(full[-1]) if full.size else int(starts[-1])
        return ids[start + n : start + n + k].tolist()
    return []
