"""Which replica serves a request: least-loaded order and conversation affinity.

Pure functions and small state, no I/O, so the Router stays about failover and the
rules here are tested without servers (docs/adr/0020-replicas-least-loaded-router.md).

* **Load** of a replica is the streams this Router has open on it plus the queue depth
  the replica reported to its last health probe (a daemon shared with other routers
  tells us about their backlog too). Lower is better.
* **Ties** are broken round robin: among replicas of equal load the one tried least
  recently wins, so an idle set of replicas is used in turn, never at random (tests
  and benchmarks stay reproducible).
* **Affinity**: a key (``Request.affinity_key``, or a hash of the start of the
  conversation when the Router is told to derive one) is mapped to a replica by
  rendezvous hashing: each replica scores ``hash(key, replica id)`` and the highest
  wins, so adding or removing one replica moves only the keys it wins or held (about
  1/N of them). Affinity yields to load: the preferred replica is put first only when
  it is healthy and at most :data:`DEFAULT_AFFINITY_MAX_IMBALANCE` streams busier than
  the least-loaded one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Literal

from inferd.limits import echo
from inferd.types import Request, TextBlock

Policy = Literal["priority", "least_loaded"]
#: The policies a Router accepts.
POLICIES: tuple[str, ...] = ("priority", "least_loaded")

#: Streams by which the preferred replica may exceed the least-loaded one and still
#: get an affine request; beyond, the request goes to the least-loaded replica.
DEFAULT_AFFINITY_MAX_IMBALANCE = 4
#: Most characters of the conversation hashed into a derived affinity key.
MAX_AFFINITY_PREFIX_CHARS = 1_000_000
#: Separators of the rendering hashed for a derived key (never typed by a user).
_ROLE_SEP, _MSG_SEP = "\x1f", "\x1e"


def check_policy(policy: str) -> Policy:
    """``policy`` when known, else ``ValueError`` naming the choices."""
    if policy not in POLICIES:
        raise ValueError(f"unknown router policy {echo(policy)}; expected one of {list(POLICIES)}")
    return policy  # type: ignore[return-value]


def check_prefix_chars(n: int | None) -> int | None:
    """``None`` (no derived keys) or a character count in 1..MAX_AFFINITY_PREFIX_CHARS."""
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_AFFINITY_PREFIX_CHARS:
        raise ValueError(
            f"affinity_prefix_chars must be an integer in 1..{MAX_AFFINITY_PREFIX_CHARS} "
            f"or unset, got {echo(n)}"
        )
    return n


def check_affinity(policy: str, prefix_chars: int | None) -> None:
    """Refuse derived affinity under ``priority``, where it would be silently ignored
    (priority order has no replicas to keep a conversation on)."""
    if prefix_chars is not None and policy != "least_loaded":
        raise ValueError(
            'affinity_prefix_chars needs policy = "least_loaded" '
            f"(policy is {echo(policy)}: backends are tried in order, not as replicas)"
        )


def conversation_prefix(request: Request, chars: int) -> str:
    """The first ``chars`` characters of the conversation's opening: system messages and
    the first user message, as ``role<US>text`` joined by ``<RS>``.

    Why only the opening and not the whole history: the Router sees messages, not
    tokens, and a later turn's history is longer than an earlier one's, so hashing "the
    first N characters of everything" would give turn 1 (shorter than N) a different
    key from turn 2. Every turn of a conversation repeats its system prompt and first
    user message verbatim, so their start is a key the whole conversation shares. Only
    text blocks count (images are not hashed).
    """
    parts: list[str] = []
    for m in request.messages:
        text = "".join(b.text for b in m.content if isinstance(b, TextBlock))
        parts.append(f"{m.role}{_ROLE_SEP}{text}")
        if m.role == "user":
            break
    return _MSG_SEP.join(parts)[:chars]


def affinity_key(request: Request, prefix_chars: int | None) -> str | None:
    """The request's explicit ``affinity_key``, else a derived one when enabled."""
    if request.affinity_key is not None:
        return "k:" + request.affinity_key
    if prefix_chars is None:
        return None
    if request.messages:
        return "p:" + conversation_prefix(request, prefix_chars)
    if request.prompt is not None:  # a raw completion: its prompt is the prefix
        return "r:" + request.prompt[:prefix_chars]
    return None


def _score(key: str, replica: str) -> int:
    digest = hashlib.blake2b(
        key.encode("utf-8", "surrogatepass"), digest_size=8, key=replica.encode()[:64]
    )
    return int.from_bytes(digest.digest(), "big")


def rendezvous(key: str, replicas: Sequence[str]) -> int:
    """Index of the replica with the highest score for ``key`` (rendezvous hashing).

    Replica ids longer than 64 bytes are keyed by their first 64 (BLAKE2b's key limit),
    so give replicas short distinct names.
    """
    if not replicas:
        raise ValueError("rendezvous needs at least one replica")
    return max(range(len(replicas)), key=lambda i: (_score(key, replicas[i]), -i))


def replica_ids(names: Iterable[str]) -> tuple[str, ...]:
    """Stable ids for rendezvous hashing: the names, with ``#k`` added to repeats.

    Backends should have distinct names (``Client(name="gpu-1")``); repeats still get
    distinct ids, but those depend on the order the backends were given.
    """
    seen: dict[str, int] = {}
    out = []
    for name in names:
        k = seen.get(name, 0)
        seen[name] = k + 1
        out.append(name if k == 0 else f"{name}#{k}")
    return tuple(out)


class LoadBalancer:
    """Orders replicas for one request; the Router tries them in that order.

    ``loads`` are per replica (outstanding streams plus reported queue depth);
    ``healthy`` says which may be preferred by affinity. Equal loads go to the replica
    tried least recently (the Router reports each try with :meth:`picked`): a round
    robin over whichever replicas are tied, however many others are excluded.
    """

    def __init__(
        self, ids: Sequence[str], *, max_imbalance: int = DEFAULT_AFFINITY_MAX_IMBALANCE
    ) -> None:
        if isinstance(max_imbalance, bool) or not isinstance(max_imbalance, int):
            raise ValueError(
                f"affinity_max_imbalance must be an integer, got {echo(max_imbalance)}"
            )
        if max_imbalance < 0:
            raise ValueError(f"affinity_max_imbalance must be >= 0, got {max_imbalance}")
        self.ids = tuple(ids)
        self.max_imbalance = max_imbalance
        self._turn = 0
        self._last = [0] * len(self.ids)  # the turn each replica was last tried at

    def picked(self, i: int) -> None:
        """Replica ``i`` is being tried: it goes behind its equals next time."""
        self._turn += 1
        self._last[i] = self._turn

    def order(
        self, loads: Sequence[int], healthy: Sequence[bool], key: str | None = None
    ) -> list[int]:
        """Replica indices, best first: the affine one (if within the limit), then by
        load, ties to the least recently tried."""
        last = self._last
        ranked = sorted(range(len(self.ids)), key=lambda i: (loads[i], last[i], i))
        if key is None:
            return ranked
        want = rendezvous(key, self.ids)
        least = min((loads[i] for i in range(len(loads)) if healthy[i]), default=loads[want])
        if healthy[want] and loads[want] - least <= self.max_imbalance:
            ranked.remove(want)
            ranked.insert(0, want)
        return ranked
