#!/usr/bin/env python3
"""A test OpenID issuer on loopback over HTTPS, shaped like GitHub Actions.

usage: oidc_issuer.py DIR BEARER

Writes DIR/ca.pem (the CA of its certificate, for 127.0.0.1 and localhost)
and prints "READY <port>". It is the issuer https://127.0.0.1:<port>, or
https://localhost:<port> to requests that name that host. Serves:
  /.well-known/openid-configuration, /jwks     the issuer's documents
  /token?audience=A&repository=R&event_name=E&ref=F[&sub=S][&exp_offset=N]
        [&aud_override=X][&kid=random]          like ACTIONS_ID_TOKEN_REQUEST_URL
        (needs "Authorization: bearer BEARER"), answers {"value": jwt}
  /rotate                                      new signing key (new kid)
  /fetches                                     how many times /jwks was fetched

It mints tokens for CI logins only: no authorization endpoint, no code flow
(route OIDC logins run against npm oidc-provider, node/oidc_provider.mjs).
"""
import datetime
import ipaddress
import json
import os
import ssl
import sys
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

DIR, BEARER = sys.argv[1], sys.argv[2]
STATE = {"key": None, "kid": None, "fetches": 0}
LOCK = threading.Lock()


def new_key():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with LOCK:
        STATE["key"] = key
        STATE["kid"] = uuid.uuid4().hex


def tls_context():
    """A CA (written to DIR/ca.pem) and a leaf for 127.0.0.1 and localhost signed by it."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test issuer CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                    x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    with open(os.path.join(DIR, "ca.pem"), "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    chain_path = os.path.join(DIR, "leaf.pem")
    with open(chain_path, "wb") as f:
        f.write(leaf.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM))
    key_path = os.path.join(DIR, "key.pem")
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(chain_path, key_path)
    return ctx


class Handler(BaseHTTPRequestHandler):
    def _json(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        path, _, query = self.path.partition("?")
        q = {k: v[0] for k, v in urllib.parse.parse_qs(query).items()}
        # The issuer is named by the host the request was sent to: 127.0.0.1
        # or localhost (a name that resolves to loopback, for the outbound
        # address checks), nothing else.
        host = self.headers.get("Host", "").rsplit(":", 1)[0]
        if host != "localhost":
            host = "127.0.0.1"
        issuer = "https://%s:%d" % (host, self.server.server_address[1])
        if path == "/.well-known/openid-configuration":
            self._json(200, {"issuer": issuer, "jwks_uri": issuer + "/jwks",
                             "response_types_supported": ["id_token"],
                             "subject_types_supported": ["public"],
                             "id_token_signing_alg_values_supported": ["RS256"]})
        elif path == "/jwks":
            with LOCK:
                STATE["fetches"] += 1
                jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(STATE["key"].public_key()))
                jwk.update({"kid": STATE["kid"], "alg": "RS256", "use": "sig"})
            self._json(200, {"keys": [jwk]})
        elif path == "/fetches":
            self._json(200, {"fetches": STATE["fetches"]})
        elif path == "/rotate":
            new_key()
            self._json(200, {"kid": STATE["kid"]})
        elif path == "/token":
            if self.headers.get("Authorization", "") != "bearer " + BEARER:
                self._json(401, {"message": "bad request token"})
                return
            repo = q.get("repository", "acme/web")
            ref = q.get("ref", "refs/heads/main")
            now = int(time.time()) + int(q.get("exp_offset", "0"))
            claims = {
                "iss": issuer,
                "aud": q.get("aud_override", q.get("audience", "")),
                "sub": q.get("sub", "repo:%s:ref:%s" % (repo, ref)),
                "repository": repo,
                "repository_owner": repo.split("/")[0],
                # GitHub's immutable ids, as strings like GitHub's.
                "repository_id": q.get("repository_id", "1000"),
                "repository_owner_id": q.get("repository_owner_id", "2000"),
                "event_name": q.get("event_name", "push"),
                "ref": ref,
                "iat": now, "nbf": now, "exp": now + 300,
                "jti": uuid.uuid4().hex,
            }
            with LOCK:
                kid = uuid.uuid4().hex if q.get("kid") == "random" else STATE["kid"]
                token = jwt.encode(claims, STATE["key"], algorithm="RS256", headers={"kid": kid})
            self._json(200, {"value": token})
        else:
            self._json(404, {})

    def log_message(self, fmt, *args):
        pass


if __name__ == "__main__":
    new_key()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = tls_context().wrap_socket(server.socket, server_side=True)
    print("READY %d" % server.server_address[1], flush=True)
    server.serve_forever()
