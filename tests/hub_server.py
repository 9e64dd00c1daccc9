"""A Hugging Face Hub on 127.0.0.1 for tests: serves model folders under the Hub's file routes
(``HEAD``/``GET /{org}/{name}/resolve/{revision}/{file}``, with the headers huggingface_hub reads:
``X-Repo-Commit``, ``ETag``, ``Content-Length``) and answers like the Hub for a missing repository,
revision or file, and for a gated repository without a token. Point ``HF_ENDPOINT`` at ``url``."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class HubRepo:
    folder: Path
    revisions: dict[str, str] = field(default_factory=lambda: {"main": "a" * 40})
    gated: bool = False


class FakeHub:
    def __init__(self, repos: dict[str, HubRepo]) -> None:
        self.repos = repos
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                hub.answer(self, body=False)

            def do_GET(self) -> None:
                hub.answer(self, body=True)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, handler: BaseHTTPRequestHandler, *, body: bool) -> None:
        self.requests.append((handler.command, handler.path))
        parts = handler.path.split("?")[0].strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return self.error(handler, 404, "RepoNotFound", "Repository Not Found")
        repo_id, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        repo = self.repos.get(repo_id)
        if repo is None:
            return self.error(handler, 401, "RepoNotFound", "Repository Not Found")
        if repo.gated and not handler.headers.get("authorization"):
            return self.error(handler, 401, "GatedRepo", "Access to this model is restricted")
        commit = repo.revisions.get(
            revision, revision if revision in repo.revisions.values() else None
        )
        if commit is None:
            return self.error(handler, 404, "RevisionNotFound", "Invalid rev id")
        path = repo.folder / filename
        if not path.is_file():
            return self.error(handler, 404, "EntryNotFound", "Entry not found")
        data = path.read_bytes()
        handler.send_response(200)
        handler.send_header("X-Repo-Commit", commit)
        handler.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        handler.send_header("Content-Length", str(len(data)))
        handler.send_header("Content-Type", "application/octet-stream")
        handler.end_headers()
        if body:
            handler.wfile.write(data)

    @staticmethod
    def error(handler: BaseHTTPRequestHandler, status: int, code: str, message: str) -> None:
        handler.send_response(status)
        handler.send_header("X-Error-Code", code)
        handler.send_header("X-Error-Message", message)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
