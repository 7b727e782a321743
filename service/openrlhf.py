"""Re-rendering OpenRLHF's queries with the RM's own chat template (opt-in:
``GENERALRM_GET_REWARD_RERENDER=true``).

OpenRLHF sends ``query`` = the decoded prompt + response *as the policy formatted them*
(its chat template and special tokens kept) and, since v0.9, ``prompts``: the prompt string
each query starts with. When the policy's template differs from the RM's, scoring the query
as is puts the RM off its training distribution. Re-rendering splits every query back into
``{prompt, response}`` (the response is what follows the prompt; trailing EOS/pad tokens of
the RM's tokenizer are dropped, as its template adds its own) and scores that item exactly as
``/score`` would.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from service.errors import InvalidInput


def _strip_trailing(text: str, tokens: Sequence[str]) -> str:
    """``text`` without trailing repeats of any of ``tokens``, in linear time and in C (a loop
    of slices copies the text once per token: quadratic on a long run of padding)."""
    alternatives = "|".join(re.escape(t[::-1]) for t in tokens if t)
    if not alternatives:
        return text
    tail = re.compile(f"(?:{alternatives})*").match(text[::-1]).end()
    return text[: len(text) - tail]


def split_queries(queries: Sequence[str], prompts: Sequence[str],
                  trailing_tokens: Sequence[str]) -> list[dict[str, str]]:
    """``{prompt, response}`` items: each query cut at the end of its prompt. Whatever comes
    before the prompt (a BOS, left padding) is dropped; a query that does not contain its
    prompt is a 422 naming it."""
    if len(prompts) != len(queries):
        raise InvalidInput(
            f"{len(queries)} queries but {len(prompts)} prompts; re-rendering "
            "(GENERALRM_GET_REWARD_RERENDER=true) needs the prompt of every query"
        )
    items = []
    for index, (query, prompt) in enumerate(zip(queries, prompts, strict=True)):
        start = query.find(prompt)
        if start < 0:
            raise InvalidInput(
                f"query[{index}] does not contain prompts[{index}]; re-rendering splits each "
                "query at the end of its prompt, so send the prompt exactly as it appears"
            )
        response = _strip_trailing(query[start + len(prompt):], trailing_tokens)
        items.append({"prompt": prompt, "response": response})
    return items
