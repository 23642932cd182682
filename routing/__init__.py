"""routing package: pure functions that filter and score Islands for one Job, the
incrementally maintained candidate index, and karma arithmetic. No I/O, no clock, no
global random, no imports of other project packages. See docs/ROUTING.md."""

from routing.filters import eligible
from routing.full_scan import full_scan_choose
from routing.index import CandidateIndex
from routing.karma import (
    DEFAULT_RATES,
    Accrual,
    KarmaRates,
    can_withdraw,
    for_completed,
    for_failure,
    for_lapsed_lease,
    for_missed_ack,
)
from routing.score import score
from routing.types import (
    ANY_KARMA_MILLI,
    REASONS,
    Decision,
    IslandView,
    JobNeeds,
    NoCandidate,
    ScoreBreakdown,
    Weights,
)

__all__ = [
    "ANY_KARMA_MILLI",
    "DEFAULT_RATES",
    "REASONS",
    "Accrual",
    "CandidateIndex",
    "Decision",
    "IslandView",
    "JobNeeds",
    "KarmaRates",
    "NoCandidate",
    "ScoreBreakdown",
    "Weights",
    "can_withdraw",
    "eligible",
    "for_completed",
    "for_failure",
    "for_lapsed_lease",
    "for_missed_ack",
    "full_scan_choose",
    "score",
]
