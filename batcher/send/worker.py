"""One row's life: its requests (one, or one per choice with fan-out), each retried under the
row's policy until it is answered or finally fails, and the replies turned into an Outcome.

The parts each do one job: ``Sender`` one paced attempt, ``RowPolicy`` when to try again,
``Budget`` what may be spent, ``OutcomeBuilder`` the row's columns; the worker orders them.
When the run stops (``Halted``, re-exported here for the runner) no further attempt of a row
is sent; replies it already paid for are recorded as an ``interrupted`` outcome, never dropped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import anyio

from batcher.config import JobConfig, RetryConfig
from batcher.flow.controller import Halted
from batcher.rows.request import RequestBuilder, RowRequest
from batcher.send.attempt import AttemptError
from batcher.send.budget import Budget, CostBudget, own_budget
from batcher.send.outcome import UNMETERED, OutcomeBuilder, asked_model, unmetered
from batcher.send.parse import OutputParser
from batcher.send.prices import PriceTable
from batcher.send.reply import Reply
from batcher.send.retry import Exhausted, RowPolicy, Sleep
from batcher.send.sender import Sender
from batcher.send.tally import Tally
from batcher.store.columns import Outcome


class _Spent:
    """What one request of a row has cost so far: attempts made, and the replies paid for
    whose output did not parse. Kept outside the request so a row stopped mid-way still
    knows what it paid for."""

    __slots__ = ("attempts", "wasted")

    def __init__(self) -> None:
        self.attempts = 0
        self.wasted: list[Reply] = []


class _Answered(NamedTuple):
    """One request of a row, answered: its reply, what parsed of it, and its cost in attempts
    and in replies paid for whose output did not parse; ``cost_usd`` is the reply's own, as its
    attempt settled it with the budget."""

    reply: Reply
    parsed: dict[str, Any] | None
    attempts: int
    wasted: list[Reply]
    cost_usd: float | None


class _RequestFailed(Exception):  # noqa: N818 - internal control flow
    def __init__(self, error: AttemptError, attempts: int, wasted: list[Reply]) -> None:
        super().__init__(str(error))
        self.error = error
        self.attempts = attempts
        self.wasted = wasted


class RowWorker:
    """Everything the workers of one run share to process rows."""

    def __init__(
        self,
        sender: Sender,
        budget: CostBudget,
        parser: OutputParser,
        outcomes: OutcomeBuilder,
        retry: RetryConfig,
        *,
        requests_per_row: int,
        sleep: Sleep = anyio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sender = sender
        self.budget = budget
        self.parser = parser
        self.outcomes = outcomes
        self.retry = retry
        self.requests_per_row = requests_per_row
        self._clock = clock
        self._flow = sender.flow
        # A row stopped mid-way (the run halted, the budget, a refused key, the grace's end)
        # after replies were paid for: its outcome, carrying their cost, goes here, since the
        # row's exception (or cancellation) goes on to the runner.
        self.interrupted: Callable[[Outcome], None] = lambda _outcome: None
        self.policy = RowPolicy(retry, clock=clock, sleep=self._backoff, on_retry=self._count_retry)
        self._sleep = sleep

    @classmethod
    def for_job(
        cls,
        config: JobConfig,
        builder: RequestBuilder,
        sender: Sender,
        parser: OutputParser,
        prices: PriceTable,
        tally: Tally,
        *,
        sleep: Sleep = anyio.sleep,
        clock: Callable[[], float] = time.monotonic,
        budget_factory: Callable[[Budget], CostBudget] = own_budget,
        secret: str | None = None,
        spent_before_usd: float = 0.0,
    ) -> RowWorker:
        """The parts of a row's life for one job's run; ``budget_factory`` makes the run's
        dollar budget of its own one (``RunOptions.budget_factory``); ``secret``, the API
        key, is kept out of every Outcome; the job had spent ``spent_before_usd`` of its cap
        before this run."""
        budget = Budget(
            config.limits.max_cost_usd, prices, tally, spent_before_usd=spent_before_usd
        )
        return cls(
            sender,
            budget_factory(budget),
            parser,
            OutcomeBuilder(config, prices, tally, secret=secret),
            config.retry,
            requests_per_row=builder.requests_per_row,
            sleep=sleep,
            clock=clock,
        )

    async def process(self, request: RowRequest) -> Outcome:
        """Send one row (fan-out included) until it is answered or finally fails.

        Raises Halted when the run stopped before the row was done; a row that had paid
        replies by then is handed to ``interrupted`` first, so no reply is thrown away."""
        started = self._clock()
        deadline = started + self.retry.deadline_s if self.retry.deadline_s is not None else None
        answers: list[_Answered] = []
        spent = _Spent()
        try:
            for _ in range(self.requests_per_row):
                spent = _Spent()
                answers.append(await self._request(request, deadline, spent))
        except _RequestFailed as failure:
            paid = [a.reply for a in answers] + [w for a in answers for w in a.wasted]
            paid += failure.wasted
            attempts = sum(a.attempts for a in answers) + failure.attempts
            latency_s = self._clock() - started
            return self.outcomes.failed(
                request,
                failure.error,
                attempts,
                latency_s,
                paid,
                unmetered_usd=self._unmetered_usd(request, paid),
            )
        except BaseException:
            # Halted, BudgetStop, a refused key or the grace's cancellation mid-row: the
            # replies already paid for are recorded, then the row's ending goes on.
            paid = [a.reply for a in answers] + [w for a in answers for w in a.wasted]
            paid += spent.wasted
            if paid:
                attempts = sum(a.attempts for a in answers) + spent.attempts
                latency_s = self._clock() - started
                outcome = self.outcomes.interrupted(
                    request,
                    attempts,
                    latency_s,
                    paid,
                    unmetered_usd=self._unmetered_usd(request, paid),
                )
                self.interrupted(outcome)
            raise
        latency_s = self._clock() - started
        if len(answers) == 1 and not answers[0].wasted:
            # One request and one paid reply, nearly every row: no sums to build, and the
            # cost its attempt settled with the budget is not priced a second time.
            answer = answers[0]
            return self.outcomes.answered(
                request,
                [answer.reply],
                [],
                answer.parsed,
                answer.attempts,
                latency_s,
                costs=[answer.cost_usd],
            )
        parsed = next((a.parsed for a in answers if a.parsed is not None), None)
        replies = [a.reply for a in answers]
        wasted = [reply for a in answers for reply in a.wasted]
        return self.outcomes.answered(
            request,
            replies,
            wasted,
            parsed,
            sum(a.attempts for a in answers),
            latency_s,
            unmetered_usd=self._unmetered_usd(request, replies + wasted),
        )

    async def _request(
        self, request: RowRequest, deadline: float | None, spent: _Spent
    ) -> _Answered:
        """One request of the row, retried by the row's policy; ``spent`` follows its cost."""
        wasted = spent.wasted  # paid for, but their output did not parse

        async def attempt() -> tuple[Reply, dict[str, Any] | None, float | None]:
            try:
                reply, cost_usd = await self._attempt(request, deadline)
            except AttemptError:
                spent.attempts += 1
                raise
            spent.attempts += 1
            try:
                return reply, await self._parse(reply), cost_usd
            except AttemptError:
                wasted.append(reply)
                raise

        try:
            (reply, parsed, cost_usd), attempts = await self.policy.run(attempt, deadline)
        except Exhausted as exhausted:
            error = exhausted.error
            if deadline is not None and self._clock() >= deadline and error.retryable:
                error = AttemptError(
                    "deadline",
                    f"no answer within retry.deadline_s={self.retry.deadline_s:g} s "
                    f"(last: {error})",
                    retryable=False,
                )
            raise _RequestFailed(error, exhausted.attempts, wasted) from None
        return _Answered(reply, parsed, attempts, wasted, cost_usd)

    async def _attempt(
        self, request: RowRequest, deadline: float | None
    ) -> tuple[Reply, float | None]:
        """One attempt, its tokens counted and its cost settled: the reply and that cost."""
        if self._flow.halted:
            raise Halted
        async with self.budget.hold(request):
            reply = await self.sender.send(request, deadline)
        tally = self.budget.tally
        tally.prompt_tokens += max(reply.prompt_tokens or 0, 0)
        tally.completion_tokens += max(reply.completion_tokens or 0, 0)
        unmetered_usd = self._unmetered_usd(request, [reply])
        if unmetered(reply):
            tally.warnings[UNMETERED] += 1
        cost_usd = self.outcomes.cost_of([reply], asked_model(request), unmetered_usd)
        self.budget.settle(cost_usd)
        return reply, cost_usd

    def _unmetered_usd(self, request: RowRequest, replies: list[Reply]) -> float:
        """What a reply of ``request`` without usage costs: its worst case (computed only
        when one of ``replies`` needs it)."""
        if not any(unmetered(reply) for reply in replies):
            return 0.0
        return self.budget.worst_case_usd(request)

    async def _backoff(self, seconds: float) -> None:
        """The wait before a retry, cut short when the run stops (the retry is not sent)."""
        await self._flow.backoff(self._sleep, seconds)

    def _count_retry(self) -> None:
        self.budget.tally.retries += 1

    async def _parse(self, reply: Reply) -> dict[str, Any] | None:
        if not self.parser.enabled:
            return None
        return await self.parser.aparse(reply.first.get("message") or {})
