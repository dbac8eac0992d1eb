"""Prices: the shipped list-price table, a job's overrides, and the cost of one reply.

Each model has a list price and a batch price (the provider Batch API's, by default half of
list, which is what Anthropic's and OpenAI's batch offers charge), and the most output tokens
one choice may take (what a budget reserves when the job sets no ``max_tokens``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from importlib import resources
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from batcher.config import (
    Job,
    PriceConfig,
    RequestConfig,
    describe_validation_error,
    describe_yaml_error,
    load_yaml,
)
from batcher.errors import ConfigError

_REPOSITORY_TABLE = Path(__file__).resolve().parents[2] / "configs" / "prices.yaml"


class _PriceFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    taken: date | str | None = None
    models: dict[str, PriceConfig]


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens."""

    input: float
    output: float
    cache_read: float | None = None
    batch_input: float | None = None
    batch_output: float | None = None
    max_output_tokens: int | None = None  # None: not known (a budget reserves the default)

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> float:
        """Never negative: a count below zero (a hostile reply) counts as none, not a credit."""
        prompt_tokens, completion_tokens = max(prompt_tokens, 0), max(completion_tokens, 0)
        cached = min(max(cached_tokens, 0), prompt_tokens)
        cache_price = self.input if self.cache_read is None else self.cache_read
        return (
            (prompt_tokens - cached) * self.input
            + cached * cache_price
            + completion_tokens * self.output
        ) / 1_000_000

    def for_batch(self) -> Price:
        """The Batch API's price: the table's batch figures, else half of list (cache too)."""
        return Price(
            self.input / 2 if self.batch_input is None else self.batch_input,
            self.output / 2 if self.batch_output is None else self.batch_output,
            None if self.cache_read is None else self.cache_read / 2,
            max_output_tokens=self.max_output_tokens,
        )


class PriceTable:
    """Model id → Price; unknown models cost None."""

    def __init__(self, prices: dict[str, Price], taken: str | None = None) -> None:
        self.prices = prices
        self.taken = taken

    @classmethod
    def load(
        cls, path: str | Path | None = None, overrides: dict[str, PriceConfig] | None = None
    ) -> PriceTable:
        if path is not None:
            text = _read(Path(path))
            where = str(path)
        elif _REPOSITORY_TABLE.is_file():
            text, where = _REPOSITORY_TABLE.read_text(encoding="utf-8"), str(_REPOSITORY_TABLE)
        else:
            text = resources.files("batcher").joinpath("prices.yaml").read_text(encoding="utf-8")
            where = "batcher/prices.yaml"
        try:
            parsed = _PriceFile.model_validate(load_yaml(text))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: not valid YAML: {describe_yaml_error(exc)}") from None
        except ValidationError as exc:
            raise ConfigError(f"{where}: {describe_validation_error(exc)}") from None
        models = dict(parsed.models)
        for name, given in (overrides or {}).items():
            known = models.get(name)
            if given.max_output_tokens is None and known is not None:
                # A job's new price keeps the table's output limit unless it sets its own.
                limit = {"max_output_tokens": known.max_output_tokens}
                models[name] = given.model_copy(update=limit)
            else:
                models[name] = given
        prices = {
            name: Price(
                p.input, p.output, p.cache_read, p.batch_input, p.batch_output, p.max_output_tokens
            )
            for name, p in models.items()
        }
        return cls(prices, str(parsed.taken) if parsed.taken else None)

    @classmethod
    def for_job(cls, job: Job, path: str | Path | None = None) -> PriceTable:
        """The table with the job's overrides, checked to price every model a budget counts."""
        prices = cls.load(path, job.config.prices)
        config = job.config
        try:
            for model, key in body_models(config.request):
                prices.require_for_budget(model, config.limits.max_cost_usd, key)
        except ConfigError as exc:
            raise ConfigError(f"{job.source}: {exc}") from None
        return prices

    def for_batch(self) -> PriceTable:
        """The same models at their Batch API prices."""
        return PriceTable({name: p.for_batch() for name, p in self.prices.items()}, self.taken)

    def get(self, model: str | None) -> Price | None:
        return self.prices.get(model) if model else None

    def require_for_budget(
        self, model: str, max_cost_usd: float | None, key: str = "request.model"
    ) -> None:
        """A budget needs the model's price, or it would count nothing and stop nothing."""
        if max_cost_usd is not None and self.get(model) is None:
            raise ConfigError(
                f"limits.max_cost_usd: model {model} has no price ({key} sets it), so the "
                f"budget cannot be counted; add it under prices: ({model}: "
                "{input: ..., output: ...}, USD per million tokens)"
            )


def body_models(request: RequestConfig) -> list[tuple[str, str]]:
    """Every model a request body can carry, with the job-file key that sets it: a list of
    models sets each body's; one model is the body's unless ``extra_body`` sets another
    (``rows/request.py`` builds the bodies so)."""
    if isinstance(request.model, list):
        return [(model, "request.model") for model in request.models]
    if "model" in request.extra_body:
        return [(str(request.extra_body["model"]), "request.extra_body.model")]
    return [(request.model, "request.model")]


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"--prices {path}: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"--prices {path}: cannot read: {exc.strerror}") from None
