"""`batcher agree`: how often several raters (the models of a list, or the ``n`` choices of a
row) give the same label: pairwise agreement and Cohen's kappa, Fleiss' kappa over all, the
rows with a split vote, and the majority label of each row.

Labels are compared after trimming and case folding. A failed row (``error`` set), a null and
an empty label are no vote. Each pair is measured over the rows where both voted; Fleiss' kappa
over the rows with at least two votes, in its form for a varying number of raters per row.
A kappa is null where chance agreement is already total (every vote the same label).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import polars as pl

from batcher.errors import ConfigError

RESPONSES = "responses"


@dataclass(frozen=True, slots=True)
class Votes:
    """One label (or None) per rater, for each row."""

    key_column: str
    keys: list[Any]
    raters: list[str]
    labels: list[list[str | None]]


@dataclass(frozen=True, slots=True)
class Agreement:
    rows: int
    raters: list[str]
    pairs: list[dict[str, Any]]
    fleiss_kappa: float | None
    split_keys: list[Any]

    def as_json(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "raters": self.raters,
            "pairs": self.pairs,
            "fleiss_kappa": self.fleiss_kappa,
            "split_rows": len(self.split_keys),
        }

    def lines(self) -> list[str]:
        lines = [f"rows: {self.rows}; raters: {', '.join(self.raters)}"]
        for pair in self.pairs:
            lines.append(
                f"{pair['a']} vs {pair['b']}: agreement {_show(pair['agreement'])} "
                f"over {pair['rows']} rows, Cohen's kappa {_show(pair['kappa'])}"
            )
        lines.append(f"Fleiss' kappa: {_show(self.fleiss_kappa)}")
        shown = ", ".join(str(k) for k in self.split_keys[:10])
        more = f", … ({len(self.split_keys) - 10} more)" if len(self.split_keys) > 10 else ""
        lines.append(
            f"split vote: {len(self.split_keys)} rows" + (f": {shown}{more}" * bool(shown))
        )
        return lines


def _show(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def read_votes(path: str | Path, column: str, by: str | None) -> Votes:
    """The labels of an output, one list per row: by the ``by`` column's values, or by choice."""
    try:
        frame = pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise ConfigError(f"{path}: cannot read output: {str(exc).splitlines()[0]}") from None
    if "error" not in frame.columns or not frame.columns:
        raise ConfigError(f"{path}: not a batcher output (no error column)")
    key = frame.columns[0]  # an output starts with its key column
    if by is None and column == "response" and RESPONSES in frame.columns:
        column = RESPONSES  # the n choices of each row
    for name, flag in ((column, "--column"), (by, "--by")):
        if name is not None and name not in frame.columns:
            raise ConfigError(
                f"{path}: {flag} {name}: no such column (columns: {', '.join(frame.columns)})"
            )
    failed = frame.get_column("error").is_not_null().to_list()
    if by is None:
        if not isinstance(frame.schema[column], pl.List):
            raise ConfigError(
                f"{path}: --column {column} holds one label a row; name the raters with --by "
                "(e.g. --by request_model) or give a list column such as responses"
            )
        # Several models without --by: a row is its key and model.
        keys = frame.get_column(key).to_list()
        if "request_model" in frame.columns:
            keys = list(zip(keys, frame.get_column("request_model").to_list(), strict=True))
        choices = [
            [] if bad or labels is None else [_label(v) for v in labels]
            for bad, labels in zip(failed, frame.get_column(column).to_list(), strict=True)
        ]
        width = max((len(c) for c in choices), default=0)
        raters = [f"choice {i + 1}" for i in range(width)]
        labels = [c + [None] * (width - len(c)) for c in choices]
        return Votes(key, keys, raters, labels)
    assert by is not None
    rater_of = [str(v) for v in frame.get_column(by).to_list()]
    raters = list(dict.fromkeys(rater_of))
    position = {name: i for i, name in enumerate(raters)}
    rows: dict[Any, list[str | None]] = {}
    for row_key, rater, value, bad in zip(
        frame.get_column(key).to_list(),
        rater_of,
        frame.get_column(column).to_list(),
        failed,
        strict=True,
    ):
        votes = rows.setdefault(row_key, [None] * len(raters))
        votes[position[rater]] = None if bad else _label(value)
    return Votes(key, list(rows), raters, list(rows.values()))


def _label(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip().casefold()
    return text or None


def measure(votes: Votes) -> Agreement:
    """Pairwise agreement and Cohen's kappa, Fleiss' kappa, and the rows with a split vote."""
    pairs = []
    for (i, a), (j, b) in combinations(enumerate(votes.raters), 2):
        both = [
            (row[i], row[j]) for row in votes.labels if row[i] is not None and row[j] is not None
        ]
        agreement, kappa = _cohen(both)
        pairs.append({"a": a, "b": b, "agreement": agreement, "kappa": kappa, "rows": len(both)})
    split = [
        key
        for key, row in zip(votes.keys, votes.labels, strict=True)
        if len({v for v in row if v is not None}) > 1
    ]
    return Agreement(len(votes.keys), votes.raters, pairs, _fleiss(votes.labels), split)


def _cohen(both: list[tuple[Any, Any]]) -> tuple[float | None, float | None]:
    if not both:
        return None, None
    count = len(both)
    observed = sum(a == b for a, b in both) / count
    first = Counter(a for a, _ in both)
    second = Counter(b for _, b in both)
    chance = sum(first[label] * second[label] for label in first) / count**2
    return observed, _kappa(observed, chance)


def _fleiss(labels: list[list[str | None]]) -> float | None:
    per_row = [Counter(v for v in row if v is not None) for row in labels]
    per_row = [c for c in per_row if c.total() >= 2]
    if not per_row:
        return None
    agreement = 0.0
    totals: Counter[str] = Counter()
    for counts in per_row:
        n = counts.total()
        agreement += (sum(c * c for c in counts.values()) - n) / (n * (n - 1))
        totals.update(counts)
    observed = agreement / len(per_row)
    votes = totals.total()
    chance = sum((c / votes) ** 2 for c in totals.values())
    return _kappa(observed, chance)


def _kappa(observed: float, chance: float) -> float | None:
    return None if chance >= 1 else (observed - chance) / (1 - chance)


def majority(votes: Votes) -> pl.DataFrame:
    """Each row's key, its majority label (ties: the earliest rater's), vote share and votes."""
    labels: list[str | None] = []
    shares: list[float | None] = []
    counts: list[int] = []
    for row in votes.labels:
        tally = Counter(v for v in row if v is not None)
        cast = tally.total()
        counts.append(cast)
        if not cast:
            labels.append(None)
            shares.append(None)
            continue
        top = max(tally.values())
        label = next(v for v in row if v is not None and tally[v] == top)
        labels.append(label)
        shares.append(top / cast)
    keys: dict[str, Any] = {votes.key_column: votes.keys}
    if votes.keys and isinstance(votes.keys[0], tuple):
        keys = {
            votes.key_column: [k for k, _ in votes.keys],
            "request_model": [m for _, m in votes.keys],
        }
    return pl.DataFrame(
        {
            **keys,
            "majority": pl.Series(labels, dtype=pl.String),
            "vote_share": pl.Series(shares, dtype=pl.Float64),
            "votes": pl.Series(counts, dtype=pl.Int64),
        }
    )
