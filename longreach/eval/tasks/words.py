"""Small fixed word lists for keys and values (offline; the order is part of the seeds).

The words live in ``longreach.data.prompts``, whose passkey word keys use them too.
"""

from longreach.data.prompts import WORDS

__all__ = ["WORDS", "distinct_numbers"]


def distinct_numbers(rng, n: int) -> list[str]:
    """``n`` different 5-digit numbers, as strings (the values needles point to)."""
    values: list[str] = []
    while len(values) < n:
        value = str(int(rng.integers(10_000, 100_000)))
        if value not in values:
            values.append(value)
    return values
