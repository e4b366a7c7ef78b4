"""Scoring a generated answer against the reference (pure functions, no model).

- ``exact_match``: the generation's first words, with surrounding punctuation stripped,
  equal the answer (case-sensitive: codes and uuids must match exactly).
- ``contains``: the answer appears anywhere in the generation (case-insensitive, RULER's
  ``string_match``).
- ``recall``: the fraction of several answers the generation contains (RULER's
  ``string_match_all``, used by variable tracking).
- ``first_token_match``: the first non-blank generated token is the answer's first
  non-blank token (GCA's passkey metric: robust to what the model writes afterwards).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

_PUNCTUATION = ".,;:!?\"'()[]{}<>`"


def _words(text: str) -> list[str]:
    return [w.strip(_PUNCTUATION) for w in text.split()]


def exact_match(prediction: str, answer: str) -> bool:
    want = [w for w in _words(answer) if w]
    if not want:
        raise ValueError("exact_match needs a non-empty answer")
    got = [w for w in _words(prediction) if w][: len(want)]
    return got == want


def contains(prediction: str, answer: str) -> bool:
    if not answer.strip():
        raise ValueError("contains needs a non-empty answer")
    return answer.strip().lower() in prediction.lower()


def recall(prediction: str, answers: Sequence[str]) -> float:
    if not answers:
        raise ValueError("recall needs at least one answer")
    return sum(contains(prediction, a) for a in answers) / len(answers)


def first_token_match(
    generated: Sequence[int],
    target: Sequence[int],
    is_blank: Callable[[int], bool] | None = None,
) -> bool:
    """Whether the first non-blank token of ``generated`` equals that of ``target``.

    ``is_blank(id)`` says a token is only whitespace (e.g. the space before a number in a
    byte-level vocabulary); such leading tokens are skipped on both sides.
    """
    def first(ids: Sequence[int]) -> int | None:
        for t in ids:
            if is_blank is None or not is_blank(int(t)):
                return int(t)
        return None

    want = first(target)
    if want is None:
        raise ValueError("first_token_match needs a target with a non-blank token")
    return first(generated) == want


def score_generation(
    prediction: str,
    answers: Sequence[str],
    generated_ids: Sequence[int] | None = None,
    target_ids: Sequence[int] | None = None,
    is_blank: Callable[[int], bool] | None = None,
) -> dict[str, float]:
    """Every metric for one sample (1.0 / 0.0 for the yes/no ones)."""
    joined = " ".join(answers)
    scores = {
        "exact_match": float(exact_match(prediction, joined)),
        "contains": float(all(contains(prediction, a) for a in answers)),
        "recall": recall(prediction, answers),
    }
    if generated_ids is not None and target_ids is not None:
        scores["first_token"] = float(first_token_match(generated_ids, target_ids, is_blank))
    return scores
