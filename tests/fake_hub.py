"""A Hugging Face Hub on loopback: the endpoints and headers `huggingface_hub` downloads through.

Point `HF_ENDPOINT` (or `endpoint=`) at `FakeHub.url` and the real client code runs against it:
- `GET /api/models/{repo}[/revision/{rev}]`: the model info (`sha`, `siblings`);
- `GET /api/models/{repo}/tree/{rev}`: the file listing huggingface_hub 2 reads (LFS files with `lfs`);
- `HEAD`/`GET /{repo}/resolve/{rev}/{file}`: `X-Repo-Commit`, `ETag` (git blob id), and for LFS files
  `X-Linked-Etag` (sha256) and `X-Linked-Size`; `Content-Length`; `Range: bytes=N-` answered with 206.
Unknown repositories, revisions and files get 404 with the Hub's `X-Error-Code`. With `token` set, every
request without `Authorization: Bearer <token>` gets 401. Every request is recorded.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin")


@dataclass
class Seen:
    method: str
    path: str
    authorization: str | None
    range: str | None


@dataclass
class FakeHub:
    """Repositories as {repo id: {commit: {file name: bytes}}} with {repo id: {branch or tag: commit}}."""

    commits: dict[str, dict[str, dict[str, bytes]]] = field(default_factory=dict)
    refs: dict[str, dict[str, str]] = field(default_factory=dict)
    token: str | None = None
    cut_once: dict[str, int] = field(default_factory=dict)  # file name -> bytes sent before dropping the connection
    seen: list[Seen] = field(default_factory=list)

    def add(self, repo: str, folder: Path, ref: str = "main") -> str:
        """Publish every file of `folder` as a new commit of `repo` under `ref`; return the commit id."""
        files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
        commit = hashlib.sha1(repo.encode() + ref.encode() + b"".join(files.values())).hexdigest()
        self.commits.setdefault(repo, {})[commit] = files
        self.refs.setdefault(repo, {})[ref] = commit
        return commit

    def start(self) -> "FakeHub":
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def downloads(self, name: str) -> list[Seen]:
        return [s for s in self.seen if s.method == "GET" and s.path.endswith(f"/{name}") and "/resolve/" in s.path]

    def resolve(self, repo: str, revision: str) -> str | None:
        if revision in self.commits.get(repo, {}):
            return revision
        return self.refs.get(repo, {}).get(revision)


def _blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _answer(self, body: bool) -> None:
            path = unquote(urlparse(self.path).path)
            hub.seen.append(Seen(self.command, path, self.headers.get("authorization"), self.headers.get("range")))
            if hub.token and self.headers.get("authorization") != f"Bearer {hub.token}":
                return self._error(401, "Unauthorized", "Invalid credentials in Authorization header", body)
            api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+)|/tree/([^/]+))?/?", path)
            if api:
                return self._api(api.group(1), api.group(2) or api.group(3) or "main", api.group(3) is not None, body)
            resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if resolve:
                return self._file(*resolve.groups(), body)
            return self._error(404, "EntryNotFound", "no such route", body)

        def _api(self, repo: str, revision: str, tree: bool, body: bool) -> None:
            commit = self._commit(repo, revision, body)
            if commit is None:
                return
            files = hub.commits[repo][commit]
            if tree:
                listing = [{"type": "file", "path": name, "size": len(data), "oid": _blob_id(data),
                            **({"lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data),
                                        "pointerSize": 134}} if name.endswith(LFS_SUFFIXES) else {})}
                           for name, data in files.items()]
                return self._json(listing, body)
            return self._json({"id": repo, "modelId": repo, "sha": commit, "private": False,
                               "siblings": [{"rfilename": name} for name in files]}, body)

        def _file(self, repo: str, revision: str, name: str, body: bool) -> None:
            commit = self._commit(repo, revision, body)
            if commit is None:
                return
            data = hub.commits[repo][commit].get(name)
            if data is None:
                return self._error(404, "EntryNotFound", f"{name} does not exist at {revision}", body)
            asked = re.fullmatch(r"bytes=(\d+)-", self.headers.get("range") or "")
            start = int(asked.group(1)) if asked else 0
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{_blob_id(data)}"')
            if name.endswith(LFS_SUFFIXES):
                self.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("X-Linked-Size", str(len(data)))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            if not body:
                return
            if name in hub.cut_once and not start:
                self.wfile.write(data[:hub.cut_once.pop(name)])  # then the connection drops mid-file
                self.close_connection = True
                return
            self.wfile.write(data[start:])

        def _commit(self, repo: str, revision: str, body: bool) -> str | None:
            if repo not in hub.commits:
                self._error(404, "RepoNotFound", f"Repository {repo} not found", body)
                return None
            commit = hub.resolve(repo, revision)
            if commit is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", body)
            return commit

        def _json(self, value, body: bool) -> None:
            data = json.dumps(value).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def _error(self, status: int, code: str, message: str, body: bool) -> None:
            data = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

    return Handler
