"""Domain errors raised by storage; ``handlers/errors.py`` and the CLI turn them into words."""

from __future__ import annotations


class DomainError(Exception):
    """An expected refusal: nothing was written."""


class InvalidAmount(DomainError):
    pass


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
