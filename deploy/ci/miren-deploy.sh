#!/usr/bin/env bash
# Deploy from any CI system that can hand the job an OIDC token.
#
#   MIREN_CLUSTER   host:port;sha1:<fingerprint>  (miren cluster export-address)
#   MIREN_APP       the app (bound to this pipeline with `miren auth ci add`)
#   MIREN_OIDC_TOKEN  the job's OIDC token with audience host:port, unless the
#                   CLI detects it itself (GitHub Actions, GitLab id_tokens as
#                   MIREN_ID_TOKEN, CircleCI CIRCLE_OIDC_TOKEN_V2)
#
# When the job image has no `miren`, install-miren.sh (beside this script)
# installs a release into MIREN_INSTALL_DIR (default $HOME/.local/bin):
#   MIREN_VERSION       release tag, v1.2.3 (default latest)
#   MIREN_GITHUB_REPO   OWNER/REPO publishing the releases, or MIREN_DOWNLOAD_URL
#   MIREN_FROM_SOURCE=1 build it with cargo instead (needs MIREN_REPO or
#                       MIREN_GITHUB_REPO, a Rust toolchain and a C compiler)
#
# Usage: miren-deploy.sh [APP_DIR]   (default: the current directory)
set -euo pipefail
: "${MIREN_CLUSTER:?set MIREN_CLUSTER to the cluster address (miren cluster export-address)}"
: "${MIREN_APP:?set MIREN_APP to the app name}"
# 1. Install the CLI when the job image does not have it.
if ! command -v miren >/dev/null; then
  export MIREN_INSTALL_DIR="${MIREN_INSTALL_DIR:-${HOME:-/root}/.local/bin}"
  export PATH="$MIREN_INSTALL_DIR:$PATH"
  install=("$(dirname "$0")/install-miren.sh" "${MIREN_VERSION:-latest}")
  [ "${MIREN_FROM_SOURCE:-}" != 1 ] || install+=(--from-source)
  "${install[@]}"
fi
# 2. Say which CLI this job runs (version, commit, build date).
miren version
# 3. Deploy: the CLI finds the job's OIDC token and the coordinator checks
#    it against the app's CI bindings.
exec miren deploy --dir "${1:-.}"
