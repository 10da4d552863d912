"""How many drafts a sequence proposes next: fewer when its own drafts are rarely kept.

A draft at position j is kept only if all before it were, so with a per-token acceptance probability a
the chance of reaching position j is a**j; drafting past the position reached less than `REACH` of the
time costs a draft step (and a verify row) for little. Each sequence's a is estimated from its own verify
steps (kept drafts / (kept drafts + rejections): the geometric law's estimate, which does not shrink as
K grows the way kept / proposed does), so the choice depends on no other sequence in the batch and seeded
sampling stays batch-invariant. Until `EVIDENCE` drafts were proposed a sequence drafts the full K.
"""

from __future__ import annotations

import dataclasses
import math

REACH = 0.25  # draft position j while a**j is at least this
EVIDENCE = 8  # proposed drafts before the estimate is trusted


@dataclasses.dataclass
class DraftRecord:
    """One sequence's speculative counts: verify steps, drafts proposed and kept, rejections."""

    steps: int = 0
    proposed: int = 0
    accepted: int = 0
    rejections: int = 0

    def add(self, proposed: int, accepted: int) -> None:
        if not proposed:
            return
        self.steps += 1
        self.proposed += proposed
        self.accepted += accepted
        self.rejections += accepted < proposed

    @property
    def acceptance_rate(self) -> float:
        """Kept / proposed (vLLM's metric)."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verify step: 1 + kept drafts per step."""
        return 1 + self.accepted / self.steps if self.steps else 0.0


def next_k(k: int, record: DraftRecord | None) -> int:
    """Drafts to propose next, 1..k, from the sequence's record (k without enough of one)."""
    if record is None or record.proposed < EVIDENCE:
        return k
    seen = record.accepted + record.rejections
    a = record.accepted / seen if seen else 1.0
    if a >= 1.0:
        return k
    if a <= 0.0:
        return 1
    return max(1, min(k, math.floor(math.log(REACH) / math.log(a))))
