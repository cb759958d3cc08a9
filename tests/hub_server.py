"""A small server speaking the parts of the Hugging Face Hub API that
``huggingface_hub`` uses to list a repo and download a file (with Range resumes),
so the real client can be tested against it through HF_ENDPOINT."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from gguf import GGUFWriter

COMMIT = "a" * 40


def write_tiny_gguf(path: Path, megabytes: int = 4) -> Path:
    """A valid GGUF (llama architecture keys, one f32 tensor) of about ``megabytes``."""
    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(512)
    writer.add_block_count(2)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_embedding_length(64)
    writer.add_file_type(0)
    values = np.random.default_rng(0).random(megabytes * 1024 * 1024 // 4, dtype=np.float32)
    writer.add_tensor("blob", values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@dataclass
class Repo:
    files: dict[str, bytes]
    wrong_sha: bool = False
    drop_after: int | None = None  # close the connection after this many bytes, once
    on_get: Callable[[], None] | None = None
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)


class HubServer:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self.handle_request(head=True)

            def do_GET(self) -> None:
                self.handle_request(head=False)

            def handle_request(self, head: bool) -> None:
                path = self.path.split("?")[0]
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"]:
                    repo_id = "/".join(parts[2:4])
                    repo = server.repos.get(repo_id)
                    if repo is None:
                        return self.reply(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
                    if len(parts) > 4 and parts[4] == "tree":  # list_repo_tree: sizes and LFS sha256
                        tree = [{"type": "file", "path": name, "size": len(data), "oid": "0" * 40,
                                 **({"lfs": {"oid": hashlib.sha256(data + (b"x" if repo.wrong_sha else b""))
                                             .hexdigest(), "size": len(data), "pointerSize": 130}}
                                    if name.endswith((".gguf", ".safetensors")) else {})}
                                for name, data in repo.files.items()]
                        return self.reply(200, json.dumps(tree).encode(), {"Content-Type": "application/json"})
                    body = json.dumps({"id": repo_id, "modelId": repo_id, "sha": COMMIT,
                                       "siblings": [{"rfilename": name} for name in repo.files]}).encode()
                    return self.reply(200, body, {"Content-Type": "application/json"})
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo_id, filename = "/".join(parts[:2]), "/".join(parts[4:])
                    repo = server.repos.get(repo_id)
                    if repo is None or filename not in repo.files:
                        return self.reply(404, b"not found", {"X-Error-Code": "EntryNotFound"})
                    data = repo.files[filename]
                    repo.requests.append(("HEAD" if head else "GET", filename, self.headers.get("Range")))
                    sha = hashlib.sha256(data + (b"x" if repo.wrong_sha else b"")).hexdigest()
                    headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"',
                               "X-Linked-Size": str(len(data)), "Accept-Ranges": "bytes",
                               "Content-Type": "application/octet-stream"}
                    if head:
                        headers["Content-Length"] = str(len(data))
                        self.send_response(200)
                        for key, value in headers.items():
                            self.send_header(key, value)
                        self.end_headers()
                        return None
                    if repo.on_get is not None:
                        repo.on_get()
                    start = 0
                    status = 200
                    if self.headers.get("Range", "").startswith("bytes="):
                        start = int(self.headers["Range"][6:].split("-")[0])
                        status = 206
                        headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                    body = data[start:]
                    if repo.drop_after is not None and start == 0:
                        cut = repo.drop_after
                        repo.drop_after = None
                        self.send_response(status)
                        for key, value in {**headers, "Content-Length": str(len(body))}.items():
                            self.send_header(key, value)
                        self.end_headers()
                        self.wfile.write(body[:cut])
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return None
                    return self.reply(status, body, headers)
                return self.reply(404, b"no route", {})

            def reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for key, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
