"""A local stand-in for GitHub releases, for the installer's journey.

    release_server.py ROOT LATEST_TAG

Serves, on 127.0.0.1 (a free port, printed as `READY <port>`), the layout
deploy/ci/install-miren.sh reads under a base URL http://127.0.0.1:<port>/releases:

    /releases/download/<tag>/<file>   ROOT/<tag>/<file>
    /releases/latest/download/<file>  302 to /releases/download/<LATEST_TAG>/<file>
    /releases/latest                  302 to /releases/tag/<LATEST_TAG>
    /releases/tag/<tag>               a page, when ROOT/<tag> exists

as GitHub does (its redirects are absolute URLs too). Everything else is 404.
"""

import http.server
import os
import re
import sys

ROOT = sys.argv[1]
LATEST = sys.argv[2]
NAME = re.compile(r"^[A-Za-z0-9._+-]+$")


class Handler(http.server.BaseHTTPRequestHandler):
    def answer(self, body: bool) -> None:
        parts = self.path.split("?", 1)[0].split("/")[1:]
        if any(p in ("", ".", "..") or not NAME.match(p) for p in parts):
            return self.status(404, body)
        origin = f"http://{self.headers.get('Host', '127.0.0.1')}"
        match parts:
            case ["releases", "download", tag, name]:
                path = os.path.join(ROOT, tag, name)
                if not os.path.isfile(path):
                    return self.status(404, body)
                with open(path, "rb") as f:
                    data = f.read()
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)
            case ["releases", "latest", "download", name]:
                self.redirect(f"{origin}/releases/download/{LATEST}/{name}")
            case ["releases", "latest"]:
                self.redirect(f"{origin}/releases/tag/{LATEST}")
            case ["releases", "tag", tag] if os.path.isdir(os.path.join(ROOT, tag)):
                data = f"<html><body>release {tag}</body></html>".encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)
            case _:
                self.status(404, body)

    def redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def status(self, code: int, body: bool) -> None:
        data = b"Not Found\n"
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_GET(self) -> None:
        self.answer(True)

    def do_HEAD(self) -> None:
        self.answer(False)


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(f"READY {server.server_address[1]}", flush=True)
server.serve_forever()
