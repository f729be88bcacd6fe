"""A local stand-in for the Hugging Face Hub's HTTP API, for the real ``huggingface_hub``.

It serves the endpoints the client reads, for repos a test creates:

* ``GET /api/models/{repo}[/revision/{rev}]`` (``?blobs=true`` adds sizes, ``blobId`` and
  ``lfs: {size, sha256, pointerSize}``), with ``sha`` the commit;
* ``GET /api/models/{repo}/tree/{rev}[/{path}]`` and ``POST .../paths-info/{rev}``: the
  listing with ``oid``, ``size`` and ``lfs.oid`` (sha256);
* ``HEAD/GET /{repo}/resolve/{rev}/{path}``: a 302 to ``/cdn/{sha256}`` on another host
  (``127.0.0.2``, as the Hub sends LFS files to a CDN host, so the client stops there for
  the metadata and never sends the token on) for LFS files, with ``X-Repo-Commit``,
  ``ETag``, ``X-Linked-Etag`` and ``X-Linked-Size``; small files are served in place;
* ``GET /cdn/{sha256}``: the bytes, honouring ``Range`` (206 and ``Content-Range``).

Errors carry the Hub's ``X-Error-Code`` (``RepoNotFound`` as a 401, ``GatedRepo``,
``RevisionNotFound``, ``EntryNotFound``), which is what ``huggingface_hub`` maps to its
exception classes. Faults a test can ask for: ``tamper`` (serve other bytes of the same
length), ``drop_after`` (close the connection after N bytes of a file, once), and
``fail_after_drop`` (answer 500 to the next request for that file). Every request is
recorded in ``requests`` as ``(method, path, Range header, had Authorization)``.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

#: Files at least this large, and every .gguf, are LFS files (the Hub's rule is 10 MB
#: or a .gitattributes pattern; GGUF repos track *.gguf with LFS).
LFS_MIN_BYTES = 10 * 1024 * 1024


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str, data: bytes) -> bool:
    return path.endswith(".gguf") or len(data) >= LFS_MIN_BYTES


@dataclass
class Repo:
    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)
    gated: bool = False

    def at(self, rev: str) -> tuple[str, dict[str, bytes]] | None:
        if rev == "main" and self.commits:
            return self.commits[-1]
        return next((c for c in self.commits if c[0] == rev or c[0].startswith(rev)), None)


def _error(status: int, code: str, message: str, commit: str | None = None) -> web.Response:
    headers = {"X-Error-Code": code, "X-Error-Message": message}
    if commit:
        headers["X-Repo-Commit"] = commit
    return web.json_response({"error": message}, status=status, headers=headers)


class HubServer:
    """Run with ``with HubServer() as hub:``; ``hub.url`` is the ``HF_ENDPOINT``."""

    def __init__(self, token: str = "hf_test_token") -> None:
        self.repos: dict[str, Repo] = {}
        self.token = token
        self.requests: list[tuple[str, str, str | None, bool]] = []
        self.tamper: set[str] = set()
        self.drop_after: dict[str, int] = {}
        self.fail_after_drop: set[str] = set()
        self.listed_sha256: dict[str, str] = {}  # path -> what the listing claims (hostile)
        self._blobs: dict[str, bytes] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.url = ""
        self.cdn_url = ""

    # ------------------------------------------------------------ test set-up

    def add_commit(self, repo_id: str, files: dict[str, bytes], *, gated: bool = False) -> str:
        """A new commit of ``repo_id`` holding ``files`` (the new ``main``); its sha."""
        repo = self.repos.setdefault(repo_id, Repo(gated=gated))
        repo.gated = repo.gated or gated
        sha = hashlib.sha1(repr((repo_id, len(repo.commits), sorted(files))).encode())
        for data in files.values():
            sha.update(data)
            self._blobs[hashlib.sha256(data).hexdigest()] = data
        commit = sha.hexdigest()
        repo.commits.append((commit, dict(files)))
        return commit

    def gets(self, path_end: str) -> list[tuple[str, str, str | None, bool]]:
        """Recorded GETs whose path ends with ``path_end``."""
        return [r for r in self.requests if r[0] == "GET" and r[1].endswith(path_end)]

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> HubServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)

    async def _start(self) -> None:
        app = web.Application(middlewares=[self._record])
        r = app.router
        r.add_get("/api/models/{owner}/{name}", self._info)
        r.add_get("/api/models/{owner}/{name}/revision/{rev}", self._info)
        r.add_get("/api/models/{owner}/{name}/tree/{rev}", self._tree)
        r.add_get("/api/models/{owner}/{name}/tree/{rev}/{path:.+}", self._tree)
        r.add_post("/api/models/{owner}/{name}/paths-info/{rev}", self._paths_info)
        r.add_route("*", "/{owner}/{name}/resolve/{rev}/{path:.+}", self._resolve)
        r.add_route("*", "/cdn/{sha}", self._cdn)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        for host in ("127.0.0.1", "127.0.0.2"):  # the Hub, and its "CDN" on another host
            site = web.TCPSite(self._runner, host, 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.url, self.cdn_url = self.url or f"http://{host}:{port}", f"http://{host}:{port}"

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        auth = request.headers.get("Authorization")
        self.requests.append(
            (request.method, request.path, request.headers.get("Range"), bool(auth))
        )
        return await handler(request)

    # ------------------------------------------------------------ API

    def _lookup(
        self, request: web.Request
    ) -> tuple[str, Repo, str, dict[str, bytes]] | web.Response:
        repo_id = f"{request.match_info['owner']}/{request.match_info['name']}"
        repo = self.repos.get(repo_id)
        if repo is None:
            return _error(401, "RepoNotFound", "Repository not found")
        found = repo.at(request.match_info.get("rev", "main"))
        if found is None:
            return _error(404, "RevisionNotFound", "Invalid rev id: " + request.match_info["rev"])
        return repo_id, repo, found[0], found[1]

    @staticmethod
    def _entry(path: str, data: bytes) -> dict[str, Any]:
        e: dict[str, Any] = {
            "type": "file",
            "oid": git_blob_id(data),
            "size": len(data),
            "path": path,
        }
        if is_lfs(path, data):
            sha = hashlib.sha256(data).hexdigest()
            e["lfs"] = {"oid": sha, "size": len(data), "pointerSize": 134}
        return e

    async def _info(self, request: web.Request) -> web.Response:
        found = self._lookup(request)
        if isinstance(found, web.Response):
            return found
        repo_id, repo, commit, files = found
        blobs = request.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path, data in files.items():
            s: dict[str, Any] = {"rfilename": path}
            if blobs:
                s |= {"size": len(data), "blobId": git_blob_id(data)}
                if is_lfs(path, data):
                    sha = self.listed_sha256.get(path) or hashlib.sha256(data).hexdigest()
                    s["lfs"] = {"size": len(data), "sha256": sha, "pointerSize": 134}
            siblings.append(s)
        body = {
            "_id": commit[:24],
            "id": repo_id,
            "modelId": repo_id,
            "sha": commit,
            "private": False,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "tags": ["gguf"],
            "library_name": "gguf",
            "siblings": siblings,
        }
        return web.json_response(body)

    async def _tree(self, request: web.Request) -> web.Response:
        found = self._lookup(request)
        if isinstance(found, web.Response):
            return found
        prefix = request.match_info.get("path", "").rstrip("/")
        files = found[3]
        out = [
            self._entry(p, d) for p, d in files.items() if not prefix or p.startswith(prefix + "/")
        ]
        return web.json_response(out)

    async def _paths_info(self, request: web.Request) -> web.Response:
        found = self._lookup(request)
        if isinstance(found, web.Response):
            return found
        form = await request.post()
        wanted = set(form.getall("paths", []))
        return web.json_response([self._entry(p, d) for p, d in found[3].items() if p in wanted])

    def _gate(self, repo: Repo, request: web.Request) -> web.Response | None:
        if not repo.gated:
            return None
        auth = request.headers.get("Authorization", "")
        if auth == f"Bearer {self.token}":
            return None
        status = 403 if auth else 401
        return _error(status, "GatedRepo", "Access to this model is restricted.")

    async def _resolve(self, request: web.Request) -> web.StreamResponse:
        found = self._lookup(request)
        if isinstance(found, web.Response):
            return found
        _, repo, commit, files = found
        if (denied := self._gate(repo, request)) is not None:
            return denied
        path = request.match_info["path"]
        if path not in files:
            return _error(404, "EntryNotFound", f"{path} does not exist", commit)
        data = files[path]
        headers = {
            "X-Repo-Commit": commit,
            "ETag": f'"{git_blob_id(data)}"',
            "Accept-Ranges": "bytes",
        }
        if not is_lfs(path, data):
            return web.Response(body=data if request.method == "GET" else None, headers=headers)
        sha = hashlib.sha256(data).hexdigest()
        headers |= {
            "X-Linked-Etag": f'"{sha}"',
            "X-Linked-Size": str(len(data)),
            "Location": f"{self.cdn_url}/cdn/{sha}?path={path}",
        }
        return web.Response(status=302, headers=headers)

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        sha = request.match_info["sha"]
        data = self._blobs.get(sha)
        if data is None:
            return web.Response(status=404)
        path = request.query.get("path", "")
        if path in self.fail_after_drop and path not in self.drop_after:
            self.fail_after_drop.discard(path)
            return web.Response(status=500, text="internal error")
        if path in self.tamper:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        start = 0
        if rng := request.headers.get("Range"):
            start = int(rng.removeprefix("bytes=").split("-")[0])
        body = data[start:]
        status, headers = 200, {"ETag": f'"{sha}"', "Accept-Ranges": "bytes"}
        if rng:
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        headers["Content-Length"] = str(len(body))
        resp = web.StreamResponse(status=status, headers=headers)
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        if path in self.drop_after:
            cut = self.drop_after.pop(path)
            await resp.write(body[:cut])
            await asyncio.sleep(0.05)
            assert request.transport is not None
            request.transport.abort()  # the connection drops mid-file
            return resp
        await resp.write(body)
        await resp.write_eof()
        return resp
