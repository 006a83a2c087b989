"""The reasoner interface: every reasoning backend turns an escalated case plus its evidence into a verdict."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from retrieval.case_memory import RetrievedCase
from riskcascade.domain import ReasonerVerdict, ReasoningRequest


class CaseReasoner(ABC):
    """Decides an escalated case from the fast model's view and the retrieved similar cases."""

    @abstractmethod
    def reason(self, request: ReasoningRequest, cases: Sequence[RetrievedCase]) -> ReasonerVerdict:
        """Return a verdict; must not raise for ordinary inputs (no evidence is a low-confidence verdict)."""
