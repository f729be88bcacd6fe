"""Opt-in fetching of remote image URLs by the HTTP bridge (docs/adr/0028-media-through-libmtmd.md).

Off by default: a request's ``image_url`` that is an ``http(s)`` URL reaches the backend
as a URL, where a local model refuses it by name (an OpenAI-compatible upstream fetches
it itself). Fetching for the caller makes the bridge a client of any host the caller
names (server-side request forgery), so it is on only for the hosts an operator lists
(``inferd bridge --allow-image-url HOST``), with a size limit and a timeout, and a URL
to any other host is refused naming it. Redirects are not followed (a listed host could
otherwise forward the bridge anywhere).
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from collections.abc import Sequence

import aiohttp

from inferd.errors import InvalidRequest
from inferd.limits import echo
from inferd.media_limits import MAX_MEDIA_BYTES
from inferd.types import ImageBlock, Request

#: Seconds one image fetch may take, connect to last byte.
DEFAULT_FETCH_TIMEOUT_S = 10.0
#: Largest image fetched, in bytes (the media limit of the backends).
DEFAULT_FETCH_MAX_BYTES = MAX_MEDIA_BYTES
#: Most URLs one request may make the bridge fetch.
MAX_FETCHES_PER_REQUEST = 8


@dataclasses.dataclass(frozen=True)
class ImageUrlPolicy:
    """Which hosts the bridge fetches images from (empty: none), and the bounds."""

    hosts: tuple[str, ...] = ()
    max_bytes: int = DEFAULT_FETCH_MAX_BYTES
    timeout_s: float = DEFAULT_FETCH_TIMEOUT_S

    def __post_init__(self) -> None:
        object.__setattr__(self, "hosts", tuple(h.strip().lower() for h in self.hosts if h))
        if self.max_bytes < 1:
            raise ValueError(f"image URL max_bytes={self.max_bytes} must be >= 1")
        if not self.timeout_s > 0:
            raise ValueError(f"image URL timeout_s={self.timeout_s} must be > 0")

    @property
    def enabled(self) -> bool:
        return bool(self.hosts)

    def check(self, url: str) -> str:
        """The URL's host when it may be fetched; ``InvalidRequest`` naming why not."""
        parts = urllib.parse.urlsplit(url)
        host = (parts.hostname or "").lower()
        if parts.scheme not in ("http", "https") or not host:
            raise InvalidRequest(f"image URL {echo(url)} is not an http(s) URL")
        if host not in self.hosts:
            raise InvalidRequest(
                f"image URL host {echo(host)} is not in the bridge's allow list "
                "(--allow-image-url); send the image as a data: URI"
            )
        return host


async def fetch(url: str, policy: ImageUrlPolicy) -> tuple[bytes, str]:
    """The body and content type of ``url``, within the policy's bounds."""
    policy.check(url)
    timeout = aiohttp.ClientTimeout(total=policy.timeout_s)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url, allow_redirects=False) as resp,
        ):
            if resp.status != 200:
                raise InvalidRequest(f"fetching image URL {echo(url)} got HTTP {resp.status}")
            if (resp.content_length or 0) > policy.max_bytes:
                raise InvalidRequest(_too_big(url, policy))
            body = await resp.content.read(policy.max_bytes + 1)
            if len(body) > policy.max_bytes:
                raise InvalidRequest(_too_big(url, policy))
            ctype = resp.headers.get("Content-Type", "image/png").split(";")[0].strip()
            return body, ctype
    except TimeoutError:
        raise InvalidRequest(
            f"fetching image URL {echo(url)} took over {policy.timeout_s:g} s"
        ) from None
    except aiohttp.ClientError as e:
        raise InvalidRequest(f"fetching image URL {echo(url)} failed: {type(e).__name__}") from None


def _too_big(url: str, policy: ImageUrlPolicy) -> str:
    return f"image URL {echo(url)} is larger than {policy.max_bytes} bytes"


async def resolve(req: Request, policy: ImageUrlPolicy | None) -> Request:
    """``req`` with its remote image URLs fetched into bytes when ``policy`` allows any
    host; unchanged when it is off (the backend decides, see the module docstring)."""
    if policy is None or not policy.enabled:
        return req
    urls = [
        b.url
        for m in req.messages
        for b in m.content
        if isinstance(b, ImageBlock) and b.url is not None
    ]
    if not urls:
        return req
    if len(urls) > MAX_FETCHES_PER_REQUEST:
        raise InvalidRequest(
            f"{len(urls)} image URLs in one request; at most {MAX_FETCHES_PER_REQUEST} "
            "(MAX_FETCHES_PER_REQUEST)"
        )
    got = {u: await fetch(u, policy) for u in dict.fromkeys(urls)}
    messages = []
    for m in req.messages:
        blocks: Sequence[object] = tuple(
            ImageBlock(data=got[b.url][0], media_type=got[b.url][1])
            if isinstance(b, ImageBlock) and b.url is not None
            else b
            for b in m.content
        )
        messages.append(dataclasses.replace(m, content=blocks))
    return dataclasses.replace(req, messages=tuple(messages))
