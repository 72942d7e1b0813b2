#!/usr/bin/env python3
"""A tiny miren app (Python standard library only).

GET /        -> a greeting
GET /whoami  -> this sandbox's workload identity: {"token": ..., "claims": ...}
               fetched from $MIREN_IDENTITY_TOKEN_URL with the sandbox secret.
"""
import base64
import json
import os
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def fetch_token(audience=None):
    url = os.environ["MIREN_IDENTITY_TOKEN_URL"]
    if audience:
        url += "?audience=" + urllib.parse.quote(audience)
    req = urllib.request.Request(
        url, headers={"Authorization": "Bearer " + os.environ["MIREN_IDENTITY_TOKEN_SECRET"]}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)["value"]


def claims_of(token):
    payload = token.split(".")[1]
    payload += "=" * (-len(payload) % 4)
    return json.loads(base64.urlsafe_b64decode(payload))


class Handler(BaseHTTPRequestHandler):
    def _send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        path, _, query = self.path.partition("?")
        if path == "/whoami":
            params = urllib.parse.parse_qs(query)
            token = fetch_token(params.get("audience", [None])[0])
            self._send(200, {"token": token, "claims": claims_of(token)})
        elif path == "/":
            self._send(200, {
                "greeting": os.environ.get("GREETING", "hello"),
                "sandbox": os.environ.get("MIREN_SANDBOX_ID"),
                "version": os.environ.get("MIREN_VERSION"),
            })
        else:
            self._send(404, {"error": "not found"})

    def log_message(self, fmt, *args):
        print(fmt % args, flush=True)


if __name__ == "__main__":
    import urllib.parse  # noqa: F401  (used above)
    port = int(os.environ.get("PORT", "8080"))
    print(f"listening on 127.0.0.1:{port}", flush=True)
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
