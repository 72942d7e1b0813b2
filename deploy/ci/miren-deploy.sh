#!/usr/bin/env bash
# Deploy from any CI system: with the job's OIDC token, or with a deploy key.
#
#   MIREN_APP       the app (bound to this pipeline with `miren auth ci add`,
#                   or the app of the deploy key)
# With OIDC:
#   MIREN_CLUSTER   host:port;sha1:<fingerprint>  (miren cluster export-address)
#   MIREN_OIDC_TOKEN  the job's OIDC token with audience host:port, unless the
#                   CLI detects it itself (GitHub Actions, GitLab id_tokens as
#                   MIREN_ID_TOKEN, CircleCI CIRCLE_OIDC_TOKEN_V2)
# Without OIDC (Jenkins, Buildkite, a cron job, ...):
#   MIREN_API_KEY   a deploy key from `miren auth key create -a APP` (a CI
#                   secret); it carries the pinned cluster address, so
#                   MIREN_CLUSTER is not needed, and it overrides every other
#                   credential
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
if [ -z "${MIREN_API_KEY:-}" ]; then
  : "${MIREN_CLUSTER:?set MIREN_CLUSTER to the cluster address (miren cluster export-address), or MIREN_API_KEY to a deploy key}"
fi
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
# 3. Deploy: the CLI trades MIREN_API_KEY, or the job's OIDC token, at the
#    cluster's token endpoint for a short-lived token for this app only.
exec miren deploy --dir "${1:-.}"
