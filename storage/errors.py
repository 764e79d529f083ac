"""Domain errors raised by storage; ``handlers/errors.py`` and the CLI turn them into words."""

from __future__ import annotations

from typing import Literal


class DomainError(Exception):
    """An expected refusal: nothing was written."""


AmountProblem = Literal["not_positive", "zero", "over_limit", "too_large", "no_reason"]


class InvalidAmount(DomainError):
    """A refused top-up or adjustment. ``problem`` says which rule it broke, so a reply can be
    worded in the reader's language instead of showing this English message."""

    def __init__(self, message: str, *, problem: AmountProblem, amount: int | None = None,
                 limit: int | None = None) -> None:
        super().__init__(message)
        self.problem = problem
        self.amount = amount
        self.limit = limit


class InsufficientBalance(DomainError):
    def __init__(self, *, needed: int, balance: int) -> None:
        super().__init__(f"balance {balance} is below the {needed} needed")
        self.needed = needed
        self.balance = balance

    @property
    def shortfall(self) -> int:
        return self.needed - self.balance


class UnknownIssue(DomainError):
    def __init__(self, number: int | None) -> None:
        super().__init__("no issue is published yet" if number is None else f"no issue {number}")
        self.number = number


class UnknownSubscriber(DomainError):
    def __init__(self, openid: str) -> None:
        super().__init__(
            f"no subscriber with openid {openid!r} (they must message the account first, "
            "or be pulled in with `newsbot users sync`)"
        )
        self.openid = openid


class IdempotencyConflict(DomainError):
    def __init__(self, key: str, original: str) -> None:
        super().__init__(
            f"idempotency key {key!r} was already used for a different action ({original}); "
            "use a new key"
        )
        self.key = key


class BroadcastRefused(DomainError):
    """A guard stopped a broadcast (already sent, quota, mode off…); the message says which."""
