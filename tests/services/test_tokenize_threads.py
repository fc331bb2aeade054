"""Where text is tokenized: short text on the event loop (cheaper than a thread hop), longer
text in a worker thread, so a long prompt never holds the loop other tenants' requests use."""

from __future__ import annotations

import threading

from kvaas.services.prompts import INLINE_TOKENIZE_CHARS, _off_loop_if_long


async def test_short_text_on_the_loop_long_text_in_a_thread() -> None:
    seen: list[threading.Thread] = []

    def encode(text: str) -> list[int]:
        seen.append(threading.current_thread())
        return [len(text)]

    short, long = "x" * INLINE_TOKENIZE_CHARS, "x" * (INLINE_TOKENIZE_CHARS + 1)
    assert await _off_loop_if_long(len(short), encode, short) == [len(short)]
    assert await _off_loop_if_long(len(long), encode, long) == [len(long)]
    here = threading.current_thread()
    assert seen[0] is here and seen[1] is not here
