"""A local Hugging Face Hub for tests: the API endpoints `huggingface_hub` calls, on loopback.

`FakeHub` keeps model repositories in memory (each commit a dict of file name -> bytes) and
serves, on 127.0.0.1 from a thread, what `HfApi.list_models`, `HfApi.model_info`,
`HfApi.list_repo_tree` and `hf_hub_download` (hence transformers' `from_pretrained`) request:

    GET  /api/models?author=&filter=&search=&sort=&limit=&expand=    the listing (newest first with sort)
    GET  /api/models/<repo>[/revision/<rev>]                         model info (siblings, sha, ...)
    GET  /api/models/<repo>/tree/<rev>[/<path>]                      the file tree
    GET  /api/agent-harnesses                                        the client's agent detection (empty)
    HEAD|GET /<repo>/resolve/<rev>/<file>                            a file: X-Repo-Commit, ETag, Content-Length

Errors carry the `X-Error-Code` header the client turns into RepositoryNotFoundError,
RevisionNotFoundError or EntryNotFoundError. The `safetensors` parameter count is read from the
safetensors headers of the stored weights, as the hub does. Every request is logged in
`requests`; a request no route answers is also logged in `unhandled` (tests assert it stays empty).
Paths starting with a prefix in `failing` get HTTP 500, as in a hub outage.

    hub = FakeHub.start()
    sha = hub.push("org/model", folder, tags=["text-generation", "license:mit"], downloads=10)
    ...  HF_ENDPOINT=hub.url
    hub.stop()
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

HOST = "127.0.0.1"


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def safetensors_parameter_counts(data: bytes) -> dict[str, int]:
    """Parameters per dtype from a safetensors file's header (8-byte length, then JSON), as the hub counts."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    counts: dict[str, int] = {}
    for name, tensor in header.items():
        if name == "__metadata__":
            continue
        size = 1
        for dim in tensor["shape"]:
            size *= dim
        counts[tensor["dtype"]] = counts.get(tensor["dtype"], 0) + size
    return counts


@dataclass
class Commit:
    sha: str
    files: dict[str, bytes]
    at: dt.datetime


@dataclass
class Repo:
    repo_id: str
    tags: list[str]
    downloads: int
    created_at: dt.datetime
    commits: list[Commit] = field(default_factory=list)

    @property
    def head(self) -> Commit:
        return self.commits[-1]

    def commit(self, revision: str | None) -> Commit | None:
        if revision in (None, "main"):
            return self.head
        return next((c for c in self.commits if c.sha == revision), None)


class FakeHub:
    """The in-memory hub and its HTTP server (see the module docstring)."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[str] = []
        self.unhandled: list[str] = []
        self.failing: list[str] = []
        """Path prefixes answered with HTTP 500 (a hub outage for those requests)."""
        self.server: ThreadingHTTPServer | None = None
        self._lock = threading.Lock()

    @classmethod
    def start(cls) -> FakeHub:
        hub = cls()
        handler = type("Handler", (_Handler,), {"hub": hub})
        hub.server = ThreadingHTTPServer((HOST, 0), handler)
        hub.server.daemon_threads = True
        threading.Thread(target=hub.server.serve_forever, daemon=True, name="fake-hub").start()
        return hub

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://{HOST}:{self.server.server_address[1]}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def push(
        self,
        repo_id: str,
        folder: str | Path | None = None,
        *,
        files: dict[str, bytes] | None = None,
        without: tuple[str, ...] = (),
        tags: list[str] | None = None,
        downloads: int = 0,
        at: dt.datetime | None = None,
    ) -> str:
        """Commits `folder`'s files (plus or overridden by `files`, less `without`) to `repo_id`; returns the sha.

        The first push creates the repo with `tags` and `downloads`; later pushes keep them
        unless given. `at` is the commit's time (the repo's lastModified); default now.
        """
        content = (
            {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()} if folder else {}
        )
        content.update(files or {})
        content = {name: data for name, data in content.items() if name not in without}
        at = at or dt.datetime.now(dt.UTC)
        with self._lock:
            repo = self.repos.get(repo_id)
            if repo is None:
                repo = self.repos[repo_id] = Repo(repo_id, list(tags or []), downloads, at)
            else:
                repo.tags = list(tags) if tags is not None else repo.tags
                repo.downloads = downloads or repo.downloads
            seed = json.dumps([repo_id, len(repo.commits), sorted((k, hashlib.sha256(v).hexdigest())
                                                                  for k, v in content.items())])  # fmt: skip
            sha = hashlib.sha1(seed.encode()).hexdigest()
            repo.commits.append(Commit(sha, content, at))
        return sha

    # --- what the API answers -------------------------------------------------------------

    def model_json(
        self, repo: Repo, commit: Commit, fields: list[str] | None, *, sizes: bool = False
    ) -> dict:
        """A model's JSON as the hub writes it; with `fields` (the `expand` list) only those plus id.

        `sizes` (the `blobs` query parameter) adds each file's size to `siblings`.
        """
        author = repo.repo_id.split("/")[0]
        weights = {n: d for n, d in commit.files.items() if n.endswith(".safetensors")}
        counts: dict[str, int] = {}
        for data in weights.values():
            for dtype, count in safetensors_parameter_counts(data).items():
                counts[dtype] = counts.get(dtype, 0) + count
        full = {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": author,
            "sha": commit.sha,
            "lastModified": _iso(commit.at),
            "createdAt": _iso(repo.created_at),
            "private": False,
            "gated": False,
            "disabled": False,
            "downloads": repo.downloads,
            "likes": 0,
            "tags": repo.tags,
            "pipeline_tag": "text-generation" if "text-generation" in repo.tags else None,
            "library_name": "transformers",
            "safetensors": {"parameters": counts, "total": sum(counts.values())} if counts else None,
            "siblings": [
                {"rfilename": name, **({"size": len(commit.files[name])} if sizes else {})}
                for name in sorted(commit.files)
            ],
        }
        if fields is None:
            return full
        return {k: v for k, v in full.items() if k in ("_id", "id") or k in fields}

    def listing(self, query: dict[str, list[str]]) -> list[dict]:
        author = (query.get("author") or [None])[0]
        search = (query.get("search") or [""])[0].lower()
        wanted_tags = query.get("filter", [])
        repos = [
            r for r in self.repos.values()
            if (author is None or r.repo_id.split("/")[0] == author) and search in r.repo_id.lower()
            and all(tag in r.tags or tag == r.repo_id for tag in wanted_tags)
        ]  # fmt: skip
        if query.get("sort", [None])[0] == "lastModified":
            repos.sort(key=lambda r: r.head.at, reverse=True)
        limit = int(query["limit"][0]) if "limit" in query else None
        fields = query.get("expand")
        return [self.model_json(r, r.head, fields) for r in repos[:limit]]


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet
        pass

    def do_HEAD(self):
        self._route(head=True)

    def do_GET(self):
        self._route(head=False)

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, *, head=False):
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, data, headers: dict[str, str] | None = None, *, head=False):
        self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})},
                   head=head)  # fmt: skip

    def _error(self, code: str, message: str, headers: dict[str, str] | None = None, *, head=False):
        self._json(404, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message, **(headers or {})},
                   head=head)  # fmt: skip

    def _route(self, *, head: bool) -> None:
        hub = self.hub
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        query = parse_qs(parts.query)
        hub.requests.append(f"{self.command} {self.path}")
        if any(path.startswith(prefix) for prefix in hub.failing):
            return self._json(500, {"error": "Internal Error - We're working hard to fix this as soon as possible!"},
                              head=head)  # fmt: skip
        if path == "/api/agent-harnesses":  # the client's agent detection (best effort)
            return self._json(200, {"standardEnvVars": [], "harnesses": {}}, head=head)
        if path == "/api/models":
            return self._json(200, hub.listing(query), head=head)
        if path.startswith("/api/models/"):
            return self._api_model(path[len("/api/models/") :], query, head=head)
        if "/resolve/" in path:
            repo_id, _, rest = path.strip("/").partition("/resolve/")
            revision, _, filename = rest.partition("/")
            return self._resolve(repo_id, revision, filename, head=head)
        hub.unhandled.append(f"{self.command} {self.path}")
        self._error("NotFound", f"no route for {path}", head=head)

    def _repo_and_commit(self, repo_id: str, revision: str | None, *, head: bool):
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error("RepoNotFound", f"Repository not found: {repo_id}", head=head)
            return None, None
        commit = repo.commit(revision)
        if commit is None:
            self._error("RevisionNotFound", f"Invalid rev id: {revision}", head=head)
            return None, None
        return repo, commit

    def _api_model(self, rest: str, query: dict[str, list[str]], *, head: bool) -> None:
        segments = rest.split("/")
        repo_id, tail = "/".join(segments[:2]), segments[2:]
        if not tail or tail[0] == "revision":
            revision = "/".join(tail[1:]) or None
            repo, commit = self._repo_and_commit(repo_id, revision, head=head)
            if repo is not None:
                info = self.hub.model_json(repo, commit, query.get("expand"), sizes="blobs" in query)
                self._json(200, info, head=head)
            return
        if tail[0] == "tree" and len(tail) >= 2:
            repo, commit = self._repo_and_commit(repo_id, tail[1], head=head)
            if repo is None:
                return
            prefix = "/".join(tail[2:]).strip("/")
            names = [n for n in sorted(commit.files) if not prefix or n.startswith(prefix + "/")]
            if prefix and not names:
                return self._error("EntryNotFound", f"{prefix} does not exist on {tail[1]}", head=head)
            entries = [{"type": "file", "path": n, "size": len(commit.files[n]),
                        "oid": hashlib.sha1(commit.files[n]).hexdigest()} for n in names]  # fmt: skip
            return self._json(200, entries, head=head)
        self.hub.unhandled.append(f"{self.command} {self.path}")
        self._error("NotFound", f"no route for /api/models/{rest}", head=head)

    def _resolve(self, repo_id: str, revision: str, filename: str, *, head: bool) -> None:
        repo, commit = self._repo_and_commit(repo_id, revision, head=head)
        if repo is None:
            return
        data = commit.files.get(filename)
        if data is None:
            return self._error("EntryNotFound", f"{filename} does not exist on {revision}",
                               {"X-Repo-Commit": commit.sha}, head=head)  # fmt: skip
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                   "Content-Type": "application/octet-stream"}  # fmt: skip
        self._send(200, data, headers, head=head)
