"""A stand-in for the Hugging Face hub on 127.0.0.1: the file endpoints ``huggingface_hub`` downloads
through (``HEAD``/``GET /{org}/{name}/resolve/{revision}/{file}`` with the commit and ETag headers the
client reads, ``/api/models/{org}/{name}`` with the repo's files), serving repos from a local directory.
It lets tests drive transformers' real download and cache code with no internet."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@contextmanager
def fake_hub(root: str) -> Iterator[tuple[str, list[str]]]:
    """Serve ``root/{org}/{name}/...`` as hub repos; yields (endpoint URL, request log "METHOD path")."""
    log: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _handle(self) -> None:
            path = self.path.split("?")[0].strip("/")
            log.append(f"{self.command} /{path}")
            parts = path.split("/")
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo = os.path.join(root, parts[2], parts[3])
                if not os.path.isdir(repo):
                    return self._reply(404, b"{}", {"X-Error-Code": "RepoNotFound"})
                names = sorted(os.listdir(repo))
                if len(parts) == 4 or parts[4] == "revision":  # model info
                    info = {"id": f"{parts[2]}/{parts[3]}", "sha": COMMIT, "siblings": [{"rfilename": f} for f in names]}
                elif parts[4] == "tree" and len(parts) == 6:  # the repo's top-level files
                    sizes = {f: os.path.getsize(os.path.join(repo, f)) for f in names}
                    info = [{"type": "file", "path": f, "size": sizes[f], "oid": "0" * 40} for f in names]
                else:  # a sub-directory of the tree: none here
                    return self._reply(404, b"{}", {"X-Error-Code": "EntryNotFound"})
                return self._reply(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
            if len(parts) >= 5 and parts[2] == "resolve":
                file = os.path.join(root, parts[0], parts[1], *parts[4:])
                if os.path.isfile(file):
                    with open(file, "rb") as f:
                        data = f.read()
                    etag = '"' + hashlib.sha256(data).hexdigest() + '"'
                    return self._reply(200, data, {"X-Repo-Commit": COMMIT, "ETag": etag})
                return self._reply(404, b"", {"X-Error-Code": "EntryNotFound"})
            self._reply(404)

        do_GET = do_HEAD = _handle

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", log
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
