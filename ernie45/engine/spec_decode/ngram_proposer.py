"""N-gram (prompt lookup) drafting: the k tokens that followed the most recent earlier occurrence of the sequence's
last n tokens, trying n from prompt_lookup_max down to prompt_lookup_min (vLLM's NgramProposer rule), with one
refinement: when the latest occurrence is too close to the end to be followed by k tokens (a loop: "a b a b"), the
latest one that is followed by k tokens is taken instead, so loops draft k tokens rather than one. Repetitive
work (editing or quoting a given text, code) is where it drafts well; elsewhere it finds no match and drafts
nothing, which costs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence


def propose_ngram(token_ids: Sequence[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k draft tokens continuing `token_ids` (empty when no n-gram of the tail occurs earlier)."""
    total = len(token_ids)
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        tail = list(token_ids[total - n:])
        best: list[int] = []
        # The latest earlier match with k tokens after it, else the latest match: scan backwards.
        for start in range(total - n - 1, -1, -1):
            if token_ids[start] == tail[0] and list(token_ids[start:start + n]) == tail:
                follow = list(token_ids[start + n:start + n + k])
                if len(follow) == k:
                    return follow
                best = best or follow
        if best:
            return best
    return []
