#!/usr/bin/env python3
"""An outside verifier of miren workload tokens, written with PyJWT only.

It does what AWS STS or Vault would: fetch the issuer's discovery document
over HTTPS (trusting the given CA file), check that it names the issuer,
fetch its jwks_uri, pick the key by the token's kid and verify RS256,
issuer and audience. Prints a JSON report; exits 1 when the token is refused.

usage: verify_jwt.py ISSUER CA_FILE AUDIENCE TOKEN [AT]

With AT (https://host:port of one coordinator of several), the discovery
document and the JWKS are fetched from that coordinator instead of the
issuer's own host; the issuer they name is still checked against ISSUER.
"""
import json
import ssl
import sys
import urllib.request

import jwt


def fetch(url, ctx):
    with urllib.request.urlopen(url, context=ctx, timeout=10) as resp:
        return {
            "status": resp.status,
            "content_type": resp.headers.get("Content-Type"),
            "cache_control": resp.headers.get("Cache-Control"),
            "body": json.loads(resp.read()),
        }


def main():
    issuer, ca_file, audience, token = sys.argv[1:5]
    at = sys.argv[5].rstrip("/") if len(sys.argv) > 5 else None
    base = issuer.rstrip("/")
    ctx = ssl.create_default_context(cafile=ca_file)

    def located(url):
        # The same path on the coordinator asked, when one is named.
        if at and url.startswith(base):
            return at + url[len(base):]
        return url

    discovery = fetch(located(base + "/.well-known/openid-configuration"), ctx)
    doc = discovery["body"]
    report = {"discovery": doc, "discovery_content_type": discovery["content_type"]}
    if doc.get("issuer") != issuer:
        report["error"] = "discovery issuer mismatch"
        print(json.dumps(report))
        return 1
    jwks = fetch(located(doc["jwks_uri"]), ctx)
    report["jwks"] = jwks["body"]
    report["jwks_content_type"] = jwks["content_type"]
    report["jwks_cache_control"] = jwks["cache_control"]
    try:
        header = jwt.get_unverified_header(token)
        keyset = jwt.PyJWKSet.from_dict(jwks["body"])
        key = next(k for k in keyset.keys if k.key_id == header.get("kid"))
        claims = jwt.decode(
            token,
            key=key,
            algorithms=["RS256"],
            audience=audience,
            issuer=issuer,
            options={"require": ["exp", "iat", "nbf", "sub", "iss", "aud"]},
        )
        report["header"] = header
        report["claims"] = claims
    except StopIteration:
        report["error"] = "no key with the token's kid in the JWKS"
    except jwt.PyJWTError as e:
        report["error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(report))
    return 0 if "claims" in report else 1


if __name__ == "__main__":
    sys.exit(main())
