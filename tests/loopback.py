"""A loopback HTTP server (127.0.0.1) that serves files the tests make, with faults on demand.

Paths: ``/<name>`` serves ``files[name]`` honouring Range; ``/truncate/<name>`` always closes the
connection halfway; ``/flaky/<name>`` closes halfway on the first request only; ``/stall/<name>``
sends half, then stops talking. Anything else is a 404. ``requests`` logs (path, Range header).
"""
from __future__ import annotations

import http.server
import re
import threading
import time


class LoopbackServer:
    def __init__(self, files: dict[str, bytes], stall_seconds: float = 5.0):
        self.files, self.requests, self.stall_seconds = files, [], stall_seconds
        self._seen: set[str] = set()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                fault, _, name = self.path.lstrip("/").partition("/") if self.path.count("/") > 1 else ("", "", self.path.lstrip("/"))
                data = server.files.get(name)
                if data is None or fault not in ("", "truncate", "flaky", "stall"):
                    self.send_error(404, "Not Found")
                    return
                start = 0
                m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if m and fault != "truncate":
                    start = int(m[1])
                    if start >= len(data):
                        self.send_error(416, "Range Not Satisfiable")
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                cut = fault == "truncate" or fault == "stall" or (fault == "flaky" and name not in server._seen)
                server._seen.add(name)
                if cut:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    if fault == "stall":
                        time.sleep(server.stall_seconds)
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
