#!/usr/bin/env python3
"""A standard OAuth client (Authlib), not our code, at miren's token endpoint.

  oauth_client.py client_credentials basic|post TOKEN_URL CA_FILE CLIENT_ID CLIENT_SECRET SCOPE
  oauth_client.py jwt_bearer TOKEN_URL CA_FILE ASSERTION SCOPE

Prints the token response as JSON, or {"error", "error_description"} and
exits 1 when the endpoint refused.
"""
import json
import os
import sys

from authlib.integrations.requests_client import OAuth2Session

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"


def main():
    mode = sys.argv[1]
    try:
        if mode == "client_credentials":
            how, url, ca, client_id, secret, scope = sys.argv[2:8]
            os.environ["REQUESTS_CA_BUNDLE"] = ca
            method = {"basic": "client_secret_basic", "post": "client_secret_post"}[how]
            s = OAuth2Session(client_id, secret, token_endpoint_auth_method=method, scope=scope)
            s.verify = ca
            token = s.fetch_token(url, grant_type="client_credentials")
        elif mode == "jwt_bearer":
            url, ca, assertion, scope = sys.argv[2:6]
            os.environ["REQUESTS_CA_BUNDLE"] = ca
            s = OAuth2Session(token_endpoint_auth_method="none", scope=scope)
            s.verify = ca
            token = s.fetch_token(url, grant_type=JWT_BEARER, assertion=assertion)
        else:
            raise SystemExit("unknown mode " + mode)
    except Exception as e:  # Authlib raises OAuthError with .error/.description
        print(json.dumps({
            "error": getattr(e, "error", type(e).__name__),
            "error_description": getattr(e, "description", str(e)),
        }))
        return 1
    print(json.dumps(dict(token)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
