"""Token counts a handler reports with its result, for the recording (docs/handlers.md).

A handler reports them the way LLM APIs do: its result is a JSON object with a `usage` object
holding `prompt_tokens` and `completion_tokens` (OpenAI's names) or `input_tokens` and
`output_tokens` (Anthropic's). The result reaches the client unchanged; the worker only reads the
counts. Anything else (no `usage`, a count that is not a whole number >= 0) reports nothing: the
counts are an annotation of the job, and a malformed one must not fail it.
"""

from __future__ import annotations

from typing import Any, Final

_IN_NAMES: Final = ("prompt_tokens", "input_tokens")
_OUT_NAMES: Final = ("completion_tokens", "output_tokens")


def _count(usage: dict[Any, Any], names: tuple[str, ...]) -> int | None:
    for name in names:
        value = usage.get(name)
        # bool is an int subclass in Python, and `true` is never a token count.
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def token_counts(result: Any) -> tuple[int | None, int | None]:
    """(tokens in, tokens out) that `result` reports in its `usage` object; None where it does
    not report one."""
    if not isinstance(result, dict):
        return None, None
    usage = result.get("usage")
    if not isinstance(usage, dict):
        return None, None
    return _count(usage, _IN_NAMES), _count(usage, _OUT_NAMES)


__all__ = ["token_counts"]
