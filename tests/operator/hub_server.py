"""A Hub-shaped HTTP server for one repository at one commit: what huggingface_hub's snapshot_download
asks for (repo info, the file tree, HEAD and GET on resolve), served from a local folder."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path


class HubServer:
    def __init__(self, repo: str, revision: str, folder: Path):
        self.repo, self.revision = repo, revision
        self.files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
        self.commit = hashlib.sha1(b"".join(self.files.values())).hexdigest()
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                self._route(send_body=True)

            def do_HEAD(self) -> None:  # noqa: N802
                self._route(send_body=False)

            def _route(self, send_body: bool) -> None:
                hub.requests.append((self.command, self.path))
                code, body, headers = hub.answer(self.path.split("?")[0])
                self.send_response(code)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if send_body:
                    self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def answer(self, path: str) -> tuple[int, bytes, dict[str, str]]:
        as_json = {"Content-Type": "application/json"}
        if path.startswith(f"/api/models/{self.repo}/revision/"):
            info = {"id": self.repo, "modelId": self.repo, "sha": self.commit,
                    "siblings": [{"rfilename": name} for name in self.files]}
            return 200, json.dumps(info).encode(), as_json
        if path.startswith(f"/api/models/{self.repo}/tree/"):
            tree = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in self.files.items()]
            return 200, json.dumps(tree).encode(), as_json
        prefix = f"/{self.repo}/resolve/"
        if path.startswith(prefix):
            revision, _, name = path[len(prefix):].partition("/")
            if revision in (self.commit, self.revision) and name in self.files:
                data = self.files[name]
                return 200, data, {"X-Repo-Commit": self.commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
            return 404, b"", {"X-Error-Code": "EntryNotFound"}
        return 404, b"", {}

    def downloads(self) -> list[str]:
        return [path for method, path in self.requests if method == "GET" and "/resolve/" in path]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
