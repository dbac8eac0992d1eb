"""What was spent: the dollars of priced rows, and how many paid rows have no known price.

A row's ``cost_usd`` is null when neither the model that answered nor the one asked has a
price: it was paid for at a price batcher does not know. A sum over such rows is therefore
"unknown", never zero, and every figure of spend says how many rows it leaves out.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Spend:
    """Dollars of the priced rows, and the paid rows left out of them for want of a price."""

    cost_usd: float = 0.0
    unpriced_rows: int = 0

    def __add__(self, other: Spend) -> Spend:
        return Spend(self.cost_usd + other.cost_usd, self.unpriced_rows + other.unpriced_rows)

    @property
    def known(self) -> bool:
        return self.unpriced_rows == 0

    def describe(self) -> str:
        """``$0.0123``; ``$0.0123 + unknown for 40 rows of unpriced models``; when nothing
        priced was paid but unpriced rows were, ``unknown (40 rows of unpriced models)``."""
        if self.known:
            return f"${self.cost_usd:.4f}"
        rows = f"{self.unpriced_rows} row{'s' if self.unpriced_rows != 1 else ''}"
        if self.cost_usd == 0:
            return f"unknown ({rows} of unpriced models)"
        return f"${self.cost_usd:.4f} + unknown for {rows} of unpriced models"
