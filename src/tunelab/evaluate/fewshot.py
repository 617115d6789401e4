"""The few-shot baseline: the base model prompted with k solved training examples before each test question.

Examples are placed as earlier conversation turns, the form chat models follow best, so the baseline answers
"would prompting alone have been enough?" on the same test split and the same scoring.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from tunelab.data.record import Record, Turn


def with_examples(test: Sequence[Record], pool: Sequence[Record], k: int, seed: int) -> list[Record]:
    """Each test record prefixed by ``k`` single-turn examples drawn from ``pool`` (deterministic by ``seed``)."""
    usable = [r for r in pool if r.answer is not None and len(r.prompt_turns) == 1]
    if k <= 0 or not usable:
        return list(test)
    rng = random.Random(seed)
    shots = rng.sample(usable, min(k, len(usable)))
    history: list[Turn] = []
    for shot in shots:
        history.extend((shot.prompt_turns[0], Turn("assistant", shot.answer or "")))
    return [Record(turns=(*history, *record.turns), system=record.system, label=record.label, source=record.source)
            for record in test]
