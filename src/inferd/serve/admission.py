"""Who gets in: requests to a running slot, connections, and bytes of unfinished frames.

Why decide at arrival (ADR 0005): a request is admitted, queued or refused the moment
its frame is read, synchronously, so a burst is counted exactly and a refused client
hears ``queue_full`` at once instead of waiting behind an unbounded queue. Every limit
a client could otherwise exhaust has a name and a default here, and the reasons for
each default are in ADR 0010 (``docs/adr/0010-hostile-input-limits.md``).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, fields
from typing import Literal

from inferd.errors import BackendUnavailable, QueueFull
from inferd.serve import wire

#: Generations running at once.
DEFAULT_MAX_CONCURRENT = 16
#: Generations admitted but waiting for a running slot; one more gets ``queue_full``.
DEFAULT_MAX_QUEUED = 64
#: Of those waiting, at most this many from one connection (fairness: one busy client
#: cannot take the whole queue). Running requests do not count.
DEFAULT_MAX_QUEUED_PER_CONNECTION = 32
#: Open client connections; one more is answered with an error frame and closed.
DEFAULT_MAX_CONNECTIONS = 512
#: Bytes of unfinished frames held across all connections; a frame that would pass it
#: is skipped up to its newline and answered ``queue_full``.
DEFAULT_MAX_BUFFERED_BYTES = 256 * 1024 * 1024
#: Seconds a started frame may take to reach its newline (time spent waiting for the
#: client's bytes); after that the connection is told why and closed.
DEFAULT_FRAME_TIMEOUT_S = 30.0
#: Seconds a stream may wait for its reader to take a frame (the socket stays full);
#: after that the request is cancelled and its slot given to others.
DEFAULT_WRITE_STALL_TIMEOUT_S = 60.0
#: The least ``max_reply_bytes`` may be: an error frame (message cut to
#: ``limits.MAX_ERROR_MESSAGE_CHARS``, id at most ``wire.MAX_ID_CHARS``) always fits.
MIN_REPLY_BYTES = 4096


@dataclass(frozen=True, slots=True)
class Limits:
    """Every bound the daemon enforces on its clients, with its default (ADR 0010)."""

    max_concurrent: int = DEFAULT_MAX_CONCURRENT
    max_queued: int = DEFAULT_MAX_QUEUED
    max_queued_per_connection: int = DEFAULT_MAX_QUEUED_PER_CONNECTION
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES
    max_frame_bytes: int = wire.MAX_FRAME_BYTES
    max_frame_elements: int = wire.MAX_FRAME_ELEMENTS
    max_reply_bytes: int = wire.MAX_FRAME_BYTES
    frame_timeout_s: float = DEFAULT_FRAME_TIMEOUT_S
    write_stall_timeout_s: float = DEFAULT_WRITE_STALL_TIMEOUT_S

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            least = {"max_queued": 0, "max_queued_per_connection": 0}.get(f.name, 1)
            if f.name == "max_reply_bytes":
                least = MIN_REPLY_BYTES
            if f.name.endswith("_s"):
                ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
                want = "a positive number of seconds"
            else:
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= least
                want = f"an integer >= {least}"
            if not ok:
                raise ValueError(f"{f.name} must be {want}, got {value!r}")


class Ticket:
    """One admitted request: queued until granted a slot, then running, then done."""

    __slots__ = ("granted", "owner", "state")

    def __init__(self, owner: object, granted: asyncio.Future[None]) -> None:
        self.owner = owner
        self.granted = granted
        self.state: Literal["queued", "running", "done"] = "queued"


class Admission:
    """Running slots and a FIFO queue with a per-connection share of it."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.running = 0
        self.draining = False
        self._queue: deque[Ticket] = deque()
        self._queued_by: dict[object, int] = {}

    @property
    def queued(self) -> int:
        return len(self._queue)

    def admit(self, owner: object) -> Ticket:
        """Run now, queue, or raise ``QueueFull`` / ``BackendUnavailable`` (draining)."""
        lim = self.limits
        if self.draining:
            raise BackendUnavailable(
                "the daemon is draining (shutting down); retry after "
                "it restarts or on another daemon"
            )
        ticket = Ticket(owner, asyncio.get_running_loop().create_future())
        if self.running < lim.max_concurrent and not self._queue:
            self._grant(ticket)
            return ticket
        if len(self._queue) >= lim.max_queued:
            raise QueueFull(
                f"queue full: {lim.max_concurrent} running and {lim.max_queued} queued "
                "(max_concurrent, max_queued); retry later"
            )
        if self._queued_by.get(owner, 0) >= lim.max_queued_per_connection:
            raise QueueFull(
                f"queue full for this connection: it already has "
                f"{lim.max_queued_per_connection} request(s) waiting "
                "(max_queued_per_connection); wait for one to start, or retry later"
            )
        self._queue.append(ticket)
        self._queued_by[owner] = self._queued_by.get(owner, 0) + 1
        return ticket

    async def wait(self, ticket: Ticket) -> None:
        """Until the ticket holds a running slot."""
        await ticket.granted

    def finish(self, ticket: Ticket) -> None:
        """The request ended (any way, even before it started): free what it held."""
        if ticket.state == "queued":
            self._queue.remove(ticket)
            self._unqueue(ticket.owner)
            ticket.granted.cancel()
        elif ticket.state == "running":
            self.running -= 1
            while self._queue and self.running < self.limits.max_concurrent:
                nxt = self._queue.popleft()
                self._unqueue(nxt.owner)
                self._grant(nxt)
        ticket.state = "done"

    def status(self) -> dict[str, int]:
        lim = self.limits
        return {
            "running": self.running,
            "queued": self.queued,
            "max_concurrent": lim.max_concurrent,
            "max_queued": lim.max_queued,
            "max_queued_per_connection": lim.max_queued_per_connection,
        }

    def _grant(self, ticket: Ticket) -> None:
        self.running += 1
        ticket.state = "running"
        if not ticket.granted.done():
            ticket.granted.set_result(None)

    def _unqueue(self, owner: object) -> None:
        left = self._queued_by[owner] - 1
        if left:
            self._queued_by[owner] = left
        else:
            del self._queued_by[owner]


class ByteBudget:
    """Bytes of unfinished frames held across all connections (``max_buffered_bytes``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        """Reserve ``n`` more bytes; False (nothing reserved) when that would pass the limit."""
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n
