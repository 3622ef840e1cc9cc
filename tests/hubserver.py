"""A small stand-in for the Hugging Face Hub on 127.0.0.1: the endpoints `huggingface_hub` uses to create a
repository and a branch, check the card, pre-upload and commit files, and to download them again.

Files are kept in memory per repository and branch; every request is recorded (method, path, headers,
body) so tests can check what the client sent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlparse

TOKEN = "hf_testTOKENthatMustNeverLeak0123456789"  # the tests' token: it must never show in output or files

REPO = r"(?P<repo>[^/]+/[^/]+)"


@dataclass
class Repo:
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[dict[str, Any]] = field(default_factory=list)
    snapshots: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit id -> files


class FakeHub:
    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[dict[str, Any]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                hub.handle(self, "GET")

            def do_HEAD(self) -> None:
                hub.handle(self, "HEAD")

            def do_POST(self) -> None:
                hub.handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id].branches[branch]

    # -- dispatch ------------------------------------------------------------------------------------------

    def handle(self, request: BaseHTTPRequestHandler, method: str) -> None:
        path = unquote(urlparse(request.path).path)
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else b""
        self.requests.append(
            {
                "method": method,
                "path": path,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "body": body,
            }
        )
        authorized = request.headers.get("Authorization") == f"Bearer {self.token}"
        routes = [
            ("GET", r"/api/whoami-v2", self.whoami),
            ("POST", r"/api/repos/create", self.create_repo),
            ("POST", r"/api/validate-yaml", lambda *_: (200, {"errors": [], "warnings": []})),
            ("POST", rf"/api/models/{REPO}/branch/(?P<branch>.+)", self.create_branch),
            ("POST", rf"/api/models/{REPO}/preupload/(?P<rev>.+)", self.preupload),
            ("POST", rf"/api/models/{REPO}/commit/(?P<rev>.+)", self.commit),
            ("GET", rf"/api/models/{REPO}/revision/(?P<rev>[^/]+)", self.info),
            ("GET", rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(/.*)?", self.tree),
            ("GET", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self.resolve),
            ("HEAD", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self.resolve),
        ]
        for verb, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if verb == method and match:
                if not authorized and not path.startswith(("/api/validate-yaml",)):
                    return self.reply(request, method, 401, {"error": "Invalid credentials in Authorization header"})
                status, payload, *headers = handler(match.groupdict(), body)
                return self.reply(request, method, status, payload, headers[0] if headers else {})
        self.reply(request, method, 404, {"error": f"no route {method} {path}"})

    def reply(self, request: Any, method: str, status: int, payload: Any, headers: dict | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        request.send_response(status)
        for key, value in (headers or {"Content-Type": "application/json"}).items():
            request.send_header(key, value)
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        if method != "HEAD":
            request.wfile.write(data)

    # -- endpoints -----------------------------------------------------------------------------------------

    def whoami(self, groups: dict, body: bytes) -> tuple:
        return 200, {"type": "user", "name": "tester", "orgs": [], "auth": {"accessToken": {"role": "write"}}}

    def create_repo(self, groups: dict, body: bytes) -> tuple:
        payload = json.loads(body)
        repo_id = f"{payload['organization']}/{payload['name']}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
        self.repos[repo_id] = Repo(private=payload.get("visibility") == "private" or payload.get("private") is True)
        return 200, {"url": f"{self.url}/{repo_id}"}

    def create_branch(self, groups: dict, body: bytes) -> tuple:
        repo = self.repos.get(groups["repo"])
        if repo is None:
            return 404, {"error": "Repository not found"}
        if groups["branch"] in repo.branches:
            return 409, {"error": "Reference already exists"}
        repo.branches[groups["branch"]] = dict(repo.branches["main"])
        return 200, {}

    def preupload(self, groups: dict, body: bytes) -> tuple:
        if groups["repo"] not in self.repos:
            return 404, {"error": "Repository not found"}
        files = json.loads(body)["files"]
        return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}

    def commit(self, groups: dict, body: bytes) -> tuple:
        repo = self.repos.get(groups["repo"])
        if repo is None or groups["rev"] not in repo.branches:
            return 404, {"error": "Repository or revision not found"}
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        for line in lines:
            if line["key"] == "file":
                repo.branches[groups["rev"]][line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        oid = hashlib.sha1(body).hexdigest()
        repo.commits.append({"branch": groups["rev"], "summary": header["summary"], "oid": oid})
        repo.snapshots[oid] = dict(repo.branches[groups["rev"]])
        return 200, {"commitUrl": f"{self.url}/{groups['repo']}/commit/{oid}", "commitOid": oid,
                     "pullRequestUrl": None}  # fmt: skip

    def _revision(self, groups: dict) -> tuple[dict[str, bytes] | None, str]:
        """The files of a branch or a commit id, and the commit id."""
        repo = self.repos.get(groups["repo"])
        if repo is None:
            return None, ""
        if groups["rev"] in repo.snapshots:
            return repo.snapshots[groups["rev"]], groups["rev"]
        branch = [c["oid"] for c in repo.commits if c["branch"] == groups["rev"]]
        return repo.branches.get(groups["rev"]), (branch[-1] if branch else "0" * 40)

    def tree(self, groups: dict, body: bytes) -> tuple:
        files, _ = self._revision(groups)
        if files is None:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        return 200, [{"type": "file", "path": name, "size": len(content), "oid": hashlib.sha1(content).hexdigest()}
                     for name, content in sorted(files.items())]  # fmt: skip

    def info(self, groups: dict, body: bytes) -> tuple:
        files, oid = self._revision(groups)
        if files is None:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        return 200, {"id": groups["repo"], "modelId": groups["repo"], "sha": oid, "private": True,
                     "siblings": [{"rfilename": name} for name in sorted(files)]}  # fmt: skip

    def resolve(self, groups: dict, body: bytes) -> tuple:
        files, oid = self._revision(groups)
        if files is None:
            return 404, b"", {"X-Error-Code": "RepoNotFound"}
        if groups["file"] not in files:
            return 404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": oid}
        content = files[groups["file"]]
        etag = hashlib.sha256(content).hexdigest()
        return 200, content, {"X-Repo-Commit": oid, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"}
