#!/usr/bin/env bash
# Installs the `miren` CLI from source with cargo (a Rust toolchain and a C
# compiler are the only requirements). Usage: install-miren.sh [GIT_REF]
set -euo pipefail
ref="${1:-}"
repo="${MIREN_REPO:?set MIREN_REPO to the git URL this project is hosted at}"
if ! command -v cargo >/dev/null; then
  echo "install-miren: cargo is needed (https://rustup.rs)" >&2
  exit 1
fi
if [ -n "$ref" ]; then
  cargo install --locked --git "$repo" --tag "$ref" cli
else
  cargo install --locked --git "$repo" cli
fi
