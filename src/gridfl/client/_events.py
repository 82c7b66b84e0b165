"""Named events with lists of handlers: what ``Job.on`` and ``PlanTrainer.on`` share."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from gridfl._exceptions import ConfigError


class EventHandlers:
    """Handlers per event name; unknown names are refused when registering.

        events = EventHandlers("job", ("accepted", "rejected"))
        events.on("rejected", print)
        events.fire("rejected", 5)  # prints 5
    """

    def __init__(self, kind: str, names: Iterable[str]) -> None:
        self.kind = kind
        self._handlers: dict[str, list[Callable[..., Any]]] = {name: [] for name in names}

    def on(self, event: str, handler: Callable[..., Any] | None = None) -> Any:
        """Register ``handler`` for ``event``; without a handler, return a decorator."""
        if event not in self._handlers:
            raise ConfigError(
                f"unknown {self.kind} event {event!r}; "
                f"expected one of {', '.join(self._handlers)}"
            )
        if handler is None:

            def register(fn: Callable[..., Any]) -> Callable[..., Any]:
                return self.on(event, fn)

            return register
        if not callable(handler):
            raise ConfigError(f"handler for {event!r} must be callable, got {handler!r}")
        self._handlers[event].append(handler)
        return handler

    def handlers(self, event: str) -> list[Callable[..., Any]]:
        """A copy of ``event``'s handlers (handlers may register others while they run)."""
        return list(self._handlers[event])

    def has(self, event: str) -> bool:
        return bool(self._handlers[event])

    def fire(self, event: str, *args: Any) -> None:
        if self._handlers[event]:
            for handler in list(self._handlers[event]):
                handler(*args)
