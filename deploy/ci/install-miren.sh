#!/usr/bin/env bash
# Installs the `miren` CLI from a release: downloads miren-linux-<arch>.zip and SHA256SUMS,
# checks the zip against SHA256SUMS before unpacking it, and puts `miren` in place atomically.
#
#   install-miren.sh [VERSION|latest] [--from-source]
#   install-miren.sh --resolve [VERSION|latest]      print the release tag (v1.2.3) and exit
#
# VERSION is a release tag, `v1.2.3` (or `1.2.3`); default `latest`.
#
# Where releases come from (MIREN_DOWNLOAD_URL, the base URL; no trailing slash needed):
#   $BASE/download/v1.2.3/FILE    a version's files
#   $BASE/latest/download/FILE    the latest release's files (may redirect)
#   $BASE/latest                  redirects to $BASE/tag/v1.2.3 (how `latest` is named)
# GitHub releases have that layout: the default base is https://github.com/OWNER/REPO/releases
# with OWNER/REPO from MIREN_GITHUB_REPO (or from MIREN_REPO when it is a github.com URL).
#
# Environment:
#   MIREN_DOWNLOAD_URL   base URL of the releases (above)
#   MIREN_GITHUB_REPO    OWNER/REPO whose GitHub releases publish miren
#   MIREN_INSTALL_DIR    where `miren` goes; default /usr/local/bin when writable, else
#                        $HOME/.local/bin
#   MIREN_DOWNLOADER     curl or wget (default: curl when installed, else wget)
#   MIREN_REPO           git URL for --from-source (default https://github.com/$MIREN_GITHUB_REPO)
#
# --from-source builds the CLI with `cargo install --locked --git MIREN_REPO [--tag VERSION] cli`
# (needs a Rust toolchain and a C compiler) and installs it the same way: for machines no release
# is built for.
set -euo pipefail

say() { echo "install-miren: $*" >&2; }
die() {
  say "error: $*"
  exit 1
}
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

version=""
from_source=0
resolve_only=0
for arg in "$@"; do
  case "$arg" in
    --from-source) from_source=1 ;;
    --resolve) resolve_only=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    -*) die "unknown option '$arg' (see --help)" ;;
    *)
      [ -z "$version" ] || die "one VERSION only (got '$version' and '$arg')"
      version="$arg"
      ;;
  esac
done
version="${version:-latest}"
if [ "$version" != latest ]; then
  [[ "$version" =~ ^v?[0-9A-Za-z][0-9A-Za-z._+-]*$ ]] || die "'$version' is not a release version (like v1.2.3) or 'latest'"
  # Release tags are v<semver>; accept the version without its v.
  [[ "$version" =~ ^[0-9] ]] && version="v$version"
fi

github_repo() {
  if [ -n "${MIREN_GITHUB_REPO:-}" ]; then
    echo "$MIREN_GITHUB_REPO"
    return
  fi
  case "${MIREN_REPO:-}" in
    https://github.com/*/* | git@github.com:*/*)
      local r="${MIREN_REPO#https://github.com/}"
      r="${r#git@github.com:}"
      echo "${r%.git}"
      ;;
    *) return 1 ;;
  esac
}

tmp=""
staged=""
cleanup() {
  [ -z "$staged" ] || rm -f "$staged"
  [ -z "$tmp" ] || rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
tmp="$(mktemp -d "${TMPDIR:-/tmp}/install-miren.XXXXXX")"

# Puts the binary FILE in place as $MIREN_INSTALL_DIR/miren: copied next to its final name,
# then renamed over it, so a running or concurrent `miren` never sees a half-written file.
install_binary() {
  local src="$1" dir
  if [ -n "${MIREN_INSTALL_DIR:-}" ]; then
    dir="$MIREN_INSTALL_DIR"
  elif [ -w /usr/local/bin ]; then
    dir=/usr/local/bin
  else
    dir="${HOME:?HOME is not set: set MIREN_INSTALL_DIR}/.local/bin"
  fi
  mkdir -p "$dir" || die "cannot create $dir: set MIREN_INSTALL_DIR to a directory you can write"
  staged="$dir/.miren.install.$$"
  cp "$src" "$staged" || die "cannot write to $dir: set MIREN_INSTALL_DIR to a directory you can write"
  chmod 0755 "$staged"
  mv -f "$staged" "$dir/miren"
  staged=""
  say "installed $dir/miren"
  "$dir/miren" version
  case ":$PATH:" in
    *":$dir:"*) ;;
    *) say "note: $dir is not on your PATH; add it: export PATH=\"$dir:\$PATH\"" ;;
  esac
}

if [ "$from_source" = 1 ]; then
  [ "$resolve_only" = 0 ] || die "--resolve names a release; it does not go with --from-source"
  command -v cargo >/dev/null || die "--from-source needs cargo (a Rust toolchain: https://rustup.rs) and a C compiler"
  repo_url="${MIREN_REPO:-}"
  if [ -z "$repo_url" ]; then
    r="$(github_repo)" || die "--from-source needs the git URL of miren: set MIREN_REPO (or MIREN_GITHUB_REPO=OWNER/REPO)"
    repo_url="https://github.com/$r"
  fi
  args=(install --locked --git "$repo_url" --root "$tmp/cargo" cli)
  if [ "$version" != latest ]; then
    args+=(--tag "$version")
    # What `miren version` prints for a release tag (see cli/build.rs).
    [[ "$version" =~ ^v[0-9] ]] && export MIREN_RELEASE_VERSION="${version#v}"
  fi
  say "building from source: cargo ${args[*]}"
  cargo "${args[@]}"
  install_binary "$tmp/cargo/bin/miren"
  exit 0
fi

if [ -n "${MIREN_DOWNLOAD_URL:-}" ]; then
  base="${MIREN_DOWNLOAD_URL%/}"
else
  r="$(github_repo)" || die "where are miren's releases? set MIREN_GITHUB_REPO=OWNER/REPO (the GitHub repository that publishes them) or MIREN_DOWNLOAD_URL (a base URL with the layout in --help)"
  base="https://github.com/$r/releases"
fi

downloader="${MIREN_DOWNLOADER:-}"
if [ -z "$downloader" ]; then
  if command -v curl >/dev/null; then
    downloader=curl
  elif command -v wget >/dev/null; then
    downloader=wget
  else
    die "neither curl nor wget is installed: install one of them (Debian: apt-get install curl)"
  fi
fi
case "$downloader" in
  curl | wget) command -v "$downloader" >/dev/null || die "MIREN_DOWNLOADER=$downloader, but $downloader is not installed" ;;
  *) die "MIREN_DOWNLOADER must be curl or wget; got '$downloader'" ;;
esac

# fetch URL DEST: 0 when DEST holds the body of a 200 answer; else 1 with `status` set to
# `notfound` (HTTP 404), `network` (no answer at all) or `http` (another answer), and `detail`.
status=""
detail=""
fetch() {
  local url="$1" dest="$2" log="$tmp/fetch.log" code rc=0
  status=""
  detail=""
  if [ "$downloader" = curl ]; then
    code="$(curl -sSL --connect-timeout 20 --retry 2 -o "$dest" -w '%{http_code}' "$url" 2>"$log")" || rc=$?
    if [ "$code" = 200 ] && [ "$rc" = 0 ]; then return 0; fi
    if [ "$code" = 404 ]; then
      status=notfound
    elif [ -z "$code" ] || [ "$code" = 000 ]; then
      status=network
    else
      status=http
    fi
    detail="$(tr '\n' ' ' <"$log")"
    [ "$status" != http ] || detail="HTTP $code ${detail}"
  else
    wget -nv -S --timeout=20 --tries=3 -O "$dest" "$url" 2>"$log" || rc=$?
    [ "$rc" = 0 ] && return 0
    code="$(sed -n 's/^ *HTTP\/[0-9.]* \([0-9][0-9][0-9]\).*/\1/p' "$log" | tail -n 1)"
    if [ "$rc" = 8 ] && [ "$code" = 404 ]; then
      status=notfound
    elif [ "$rc" = 4 ] || [ -z "$code" ]; then
      status=network
    else
      status=http
    fi
    detail="$(grep -v '^  ' "$log" | tr '\n' ' ')"
    [ "$status" != http ] || detail="HTTP $code ${detail}"
  fi
  return 1
}

unreachable() {
  die "could not reach $1 (no answer: network down, a proxy or firewall, or a wrong base URL): ${detail}
  releases are downloaded from $base; set MIREN_DOWNLOAD_URL to a mirror with the same layout, or install with --from-source"
}

# The tag `latest` stands for: $BASE/latest redirects to $BASE/tag/<tag>.
resolve_latest() {
  local url="$base/latest" final=""
  if [ "$downloader" = curl ]; then
    final="$(curl -sSL --connect-timeout 20 --retry 2 -o /dev/null -w '%{http_code} %{url_effective}' "$url" 2>"$tmp/fetch.log")" || true
    case "$final" in
      "200 "*) final="${final#200 }" ;;
      "000 "* | "")
        detail="$(tr '\n' ' ' <"$tmp/fetch.log")"
        unreachable "$url"
        ;;
      *) die "$url answered HTTP ${final%% *}: no latest release there (see $base)" ;;
    esac
  else
    local rc=0
    wget -nv -S --timeout=20 --tries=3 -O /dev/null "$url" 2>"$tmp/fetch.log" || rc=$?
    if [ "$rc" = 4 ]; then
      detail="$(grep -v '^  ' "$tmp/fetch.log" | tr '\n' ' ')"
      unreachable "$url"
    fi
    [ "$rc" = 0 ] || die "$url answered an error: no latest release there (see $base)"
    final="$(sed -n 's/^ *Location: *\([^ ]*\).*/\1/p' "$tmp/fetch.log" | tr -d '\r' | tail -n 1)"
  fi
  case "$final" in
    */tag/*) ;;
    *) die "$url did not lead to a release (it should redirect to $base/tag/<version>): no release published yet? See $base" ;;
  esac
  final="${final##*/tag/}"
  final="${final%%[?#]*}"
  [[ "$final" =~ ^v?[0-9A-Za-z][0-9A-Za-z._+-]*$ ]] || die "$url named an odd release tag '$final'"
  echo "$final"
}

if [ "$resolve_only" = 1 ]; then
  if [ "$version" = latest ]; then resolve_latest; else echo "$version"; fi
  exit 0
fi

case "$(uname -s)" in
  Linux) os=linux ;;
  *) die "miren releases are built for Linux; this machine is $(uname -s). Build from source instead: install-miren.sh ${version} --from-source" ;;
esac
machine="$(uname -m)"
case "$machine" in
  x86_64 | amd64) arch=amd64 ;;
  aarch64 | arm64) arch=arm64 ;;
  *) die "no miren release is built for this machine's architecture '$machine' (supported: x86_64/amd64, aarch64/arm64). Build from source instead: install-miren.sh ${version} --from-source" ;;
esac
asset="miren-$os-$arch.zip"
if [ "$version" = latest ]; then
  dir_url="$base/latest/download"
  what="the latest release"
else
  dir_url="$base/download/$version"
  what="release $version"
fi

say "downloading $asset of $what from $base"
if ! fetch "$dir_url/SHA256SUMS" "$tmp/SHA256SUMS"; then
  case "$status" in
    notfound)
      if [ "$version" = latest ]; then
        die "no latest release found at $base ($dir_url/SHA256SUMS: HTTP 404). The releases are listed at $base"
      fi
      die "version $version not found: $dir_url/SHA256SUMS answered HTTP 404. The releases are listed at $base (tags look like v1.2.3)"
      ;;
    network) unreachable "$dir_url/SHA256SUMS" ;;
    *) die "downloading $dir_url/SHA256SUMS failed: $detail" ;;
  esac
fi
if ! fetch "$dir_url/$asset" "$tmp/$asset"; then
  case "$status" in
    notfound) die "$what has no $asset ($dir_url/$asset: HTTP 404): it has no build for $os/$arch; install with --from-source" ;;
    network) unreachable "$dir_url/$asset" ;;
    *) die "downloading $dir_url/$asset failed: $detail" ;;
  esac
fi

# Verify before anything reads the archive.
expected="$(awk -v f="$asset" '$2 == f || $2 == "*" f { print $1; exit }' "$tmp/SHA256SUMS")"
[ -n "$expected" ] || die "SHA256SUMS of $what has no entry for $asset: refusing to install a download that cannot be checked; nothing was installed"
if command -v sha256sum >/dev/null; then
  actual="$(sha256sum "$tmp/$asset" | awk '{ print $1 }')"
elif command -v shasum >/dev/null; then
  actual="$(shasum -a 256 "$tmp/$asset" | awk '{ print $1 }')"
else
  die "neither sha256sum nor shasum is installed, so the download cannot be checked (Debian: coreutils)"
fi
if [ "$actual" != "$expected" ]; then
  die "checksum mismatch for $asset: SHA256SUMS says $expected, the download is $actual. The file is corrupt or was tampered with; nothing was installed"
fi
say "checksum verified: $actual  $asset"

mkdir "$tmp/unpacked"
if command -v unzip >/dev/null; then
  unzip -q "$tmp/$asset" miren -d "$tmp/unpacked" || die "$asset does not unpack (or holds no 'miren')"
elif command -v python3 >/dev/null; then
  python3 -c 'import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("miren"))' "$tmp/$asset" "$tmp/unpacked/miren" || die "$asset does not unpack (or holds no 'miren')"
else
  die "neither unzip nor python3 is installed to unpack $asset (Debian: apt-get install unzip)"
fi
chmod 0755 "$tmp/unpacked/miren"

# It must run here and be what was asked for, before it replaces anything.
if ! line="$("$tmp/unpacked/miren" version 2>&1)"; then
  die "the downloaded miren does not run on this machine: ${line}
  (an older C library than the build machine's?) Build from source instead: install-miren.sh ${version} --from-source"
fi
if [ "$version" != latest ]; then
  case "$line" in
    "miren ${version#v} (commit "*) ;;
    *) die "$asset of release $version says '$line', not version ${version#v}; nothing was installed" ;;
  esac
fi
install_binary "$tmp/unpacked/miren"
