#!/usr/bin/env bash
# Installs what miren's tests use on a fresh Debian machine (scripts/install-test-deps.sh, each
# package only when missing: the list and why each is needed are there), then runs them:
# cargo test --workspace (unit tests and the journeys on real processes).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-test-deps.sh

if command -v capnp >/dev/null && [ -d .git ]; then
  echo "==> checking generated Cap'n Proto code against the schema"
  CAPNP_REGEN=1 cargo build --quiet -p schema
  if ! git diff --exit-code --stat -- schema/src; then
    echo "error: schema/src/miren_capnp.rs is out of date with schema/capnp/*.capnp; commit the regenerated file" >&2
    exit 1
  fi
fi

echo "==> cargo build --workspace --bins (the journeys drive the real miren binary)"
cargo build --workspace --bins
echo "==> cargo test --workspace"
exec cargo test --workspace "$@"
