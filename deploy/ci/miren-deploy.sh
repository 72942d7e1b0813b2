#!/usr/bin/env bash
# Deploy from any CI system that can hand the job an OIDC token.
#
#   MIREN_CLUSTER   host:port;sha1:<fingerprint>  (miren cluster export-address)
#   MIREN_APP       the app (bound to this pipeline with `miren auth ci add`)
#   MIREN_OIDC_TOKEN  the job's OIDC token with audience host:port, unless the
#                   CLI detects it itself (GitHub Actions, GitLab id_tokens as
#                   MIREN_ID_TOKEN, CircleCI CIRCLE_OIDC_TOKEN_V2)
set -euo pipefail
: "${MIREN_CLUSTER:?set MIREN_CLUSTER to the cluster address (miren cluster export-address)}"
: "${MIREN_APP:?set MIREN_APP to the app name}"
# 1. Install the CLI when the job image does not have it.
command -v miren >/dev/null || "$(dirname "$0")/install-miren.sh"
# 2. Say which CLI this job runs (version, commit, build date).
miren version
# 3. Deploy: the CLI finds the job's OIDC token and the coordinator checks
#    it against the app's CI bindings.
exec miren deploy --dir "${1:-.}"
