#!/usr/bin/env bash
# Builds the release archives of the `miren` CLI.
#
#   scripts/release.sh VERSION [OUT_DIR]        (OUT_DIR defaults to dist/)
#
# VERSION is `1.2.3` or the tag `v1.2.3` (semver: `1.2.3-rc.1` too). Writes, in OUT_DIR:
#   miren-linux-amd64.zip, miren-linux-arm64.zip   each holding one file, `miren` (mode 0755)
#   SHA256SUMS                                     `sha256sum` format, over the zips written
#
# The host's own architecture is always built. The other one is cross-built only when its
# Rust target (rustup target add aarch64-unknown-linux-gnu / x86_64-unknown-linux-gnu) and a
# cross C compiler (aarch64-linux-gnu-gcc / x86_64-linux-gnu-gcc) are installed; otherwise it
# says so and skips it (the release workflow builds each architecture on its own runner).
#
# Reproducible inputs: `cargo build --locked` against the committed Cargo.lock, the release
# profile, SOURCE_DATE_EPOCH (default: the commit's time) as the build date `miren version`
# prints and as every zip timestamp, the zips written by Python's zipfile with fixed metadata.
# The binary also holds the paths it was built at (panic locations), so a byte-identical
# rebuild needs the same toolchain and paths (the release workflow's runner). The tree must be
# clean (the embedded commit must describe the source), unless MIREN_RELEASE_ALLOW_DIRTY=1.
#
# Environment:
#   SOURCE_DATE_EPOCH           build date (Unix seconds); default `git log -1 --format=%ct`
#   MIREN_RELEASE_BINARY=PATH   pack this already built binary instead of building (its
#                               architecture is read from its ELF header); it must print
#                               VERSION in `miren version`, else nothing is packed
#   MIREN_RELEASE_PROFILE=dev   build with the dev profile into the workspace's own target dir:
#                               for the tests, which then rebuild only the cli crate (seconds)
#                               instead of a release build of everything (see ARCHITECTURE.md);
#                               SOURCE_DATE_EPOCH reaches cargo only when set by the caller
#   MIREN_RELEASE_ALLOW_DIRTY=1 build from a tree with uncommitted changes (tests, trials)
#   CARGO                       the cargo to run (default: cargo)
set -euo pipefail

die() {
  echo "release: error: $*" >&2
  exit 1
}

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  die "usage: scripts/release.sh VERSION [OUT_DIR]"
fi
version="${1#v}"
[[ "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+([-+][0-9A-Za-z.+-]+)?$ ]] ||
  die "VERSION must look like 1.2.3, v1.2.3 or 1.2.3-rc.1; got '$1'"

root="$(cd "$(dirname "$0")/.." && pwd)"
out_dir="${2:-$root/dist}"
cargo="${CARGO:-cargo}"
profile="${MIREN_RELEASE_PROFILE:-release}"
case "$profile" in
  release) profile_dir=release ;;
  dev) profile_dir=debug ;;
  *) die "MIREN_RELEASE_PROFILE must be release or dev (dev is for tests); got '$profile'" ;;
esac
command -v python3 >/dev/null || die "python3 is needed to write the zips"
command -v sha256sum >/dev/null || die "sha256sum (coreutils) is needed to write SHA256SUMS"

in_git=0
git -C "$root" rev-parse --git-dir >/dev/null 2>&1 && in_git=1
if [ -n "${SOURCE_DATE_EPOCH:-}" ]; then
  export SOURCE_DATE_EPOCH
else
  [ "$in_git" = 1 ] || die "not a git checkout: set SOURCE_DATE_EPOCH (Unix seconds) for the build date"
  SOURCE_DATE_EPOCH="$(git -C "$root" log -1 --format=%ct)"
  # The dev profile leaves it out of cargo's environment: aws-lc-sys's build script tracks it,
  # so setting it would rebuild the whole tree, and cli/build.rs falls back to the same commit
  # time by itself.
  [ "$profile" = dev ] || export SOURCE_DATE_EPOCH
fi
[[ "$SOURCE_DATE_EPOCH" =~ ^[0-9]+$ ]] || die "SOURCE_DATE_EPOCH must be Unix seconds; got '$SOURCE_DATE_EPOCH'"
export MIREN_RELEASE_VERSION="$version"

# Our name for an architecture, from `uname -m` or an ELF header's e_machine.
arch_of_machine() {
  case "$1" in
    x86_64 | amd64) echo amd64 ;;
    aarch64 | arm64) echo arm64 ;;
    *) return 1 ;;
  esac
}
triple_of() {
  case "$1" in
    amd64) echo x86_64-unknown-linux-gnu ;;
    arm64) echo aarch64-unknown-linux-gnu ;;
  esac
}
[ "$(uname -s)" = Linux ] || die "release builds are made on Linux (this is $(uname -s))"
host_arch="$(arch_of_machine "$(uname -m)")" ||
  die "this machine is $(uname -m); release builds are made on x86_64 (amd64) or aarch64 (arm64)"

# The architecture of an ELF binary (e_machine at offset 18, little-endian).
elf_arch() {
  local magic machine
  magic="$(od -An -tx1 -N4 "$1" | tr -d ' \n')"
  [ "$magic" = 7f454c46 ] || return 1
  machine="$(od -An -tx1 -j18 -N2 "$1" | tr -d ' \n')"
  case "$machine" in
    3e00) echo amd64 ;;
    b700) echo arm64 ;;
    *) return 1 ;;
  esac
}

# Checks that BINARY (of ARCH) is VERSION (and, when COMMIT is given, built from it): runs
# `miren version` when this machine can run it, else looks for the line the build embeds.
check_version() {
  local bin="$1" arch="$2" want_commit="${3:-}" line
  if [ "$arch" = "$host_arch" ]; then
    line="$("$bin" version)" || die "$bin does not run: cannot check its version"
    echo "    $line"
    case "$line" in
      "miren $version (commit "*) ;;
      *) die "$bin prints '$line', not version $version: rebuild it with MIREN_RELEASE_VERSION=$version" ;;
    esac
    if [ -n "$want_commit" ]; then
      case "$line" in
        *"(commit $want_commit,"*) ;;
        *) die "$bin was built from another commit than $want_commit (did HEAD move during the build?): '$line'" ;;
      esac
    fi
  elif grep -aq -- "$version (commit $want_commit" "$bin"; then
    echo "    embeds version $version (a $arch binary: not run here)"
  else
    die "$bin ($arch) does not embed version $version: rebuild it with MIREN_RELEASE_VERSION=$version"
  fi
  # Machines with an older C library than this one's cannot run it: say which is needed.
  if command -v objdump >/dev/null; then
    local glibc
    glibc="$(objdump -T "$bin" 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n 1)" || true
    [ -z "$glibc" ] || echo "    needs glibc ${glibc#GLIBC_} or later"
  fi
}

# Writes ZIP holding BINARY as `miren`, mode 0755, every timestamp SOURCE_DATE_EPOCH.
pack() {
  python3 - "$1" "$2" "$SOURCE_DATE_EPOCH" <<'PY'
import os, sys, time, zipfile
src, dst, epoch = sys.argv[1], sys.argv[2], int(sys.argv[3])
# A zip cannot hold a date before 1980; its fields are whole even seconds.
info = zipfile.ZipInfo("miren", date_time=time.gmtime(max(epoch, 315532800))[:6])
info.create_system = 3  # Unix, so that unzip restores the mode
info.external_attr = 0o100755 << 16
info.compress_type = zipfile.ZIP_DEFLATED
with open(src, "rb") as f:
    data = f.read()
tmp = dst + ".partial"
with zipfile.ZipFile(tmp, "w") as z:
    z.writestr(info, data, compresslevel=6)  # zlib's default: level 9 is 3x slower for 1% less
os.replace(tmp, dst)
PY
}

if [ "$in_git" = 1 ] && [ "${MIREN_RELEASE_ALLOW_DIRTY:-}" != 1 ] && [ -z "${MIREN_RELEASE_BINARY:-}" ]; then
  if [ -n "$(git -C "$root" status --porcelain)" ]; then
    git -C "$root" status --short >&2
    die "the tree has uncommitted changes, so the commit in \`miren version\` would not describe the binary: commit or stash them (MIREN_RELEASE_ALLOW_DIRTY=1 to build anyway)"
  fi
fi

mkdir -p "$out_dir"
out_dir="$(cd "$out_dir" && pwd)"
rm -f "$out_dir"/miren-linux-*.zip "$out_dir/SHA256SUMS"
commit=unknown
[ "$in_git" = 1 ] && commit="$(git -C "$root" rev-parse --short=12 HEAD)"
echo "==> miren $version (commit $commit, SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH) into $out_dir"

built=()
if [ -n "${MIREN_RELEASE_BINARY:-}" ]; then
  bin="$MIREN_RELEASE_BINARY"
  [ -f "$bin" ] || die "MIREN_RELEASE_BINARY=$bin is not a file"
  arch="$(elf_arch "$bin")" || die "MIREN_RELEASE_BINARY=$bin is not an x86_64 or aarch64 ELF binary"
  echo "==> packing $bin ($arch)"
  check_version "$bin" "$arch"
  pack "$bin" "$out_dir/miren-linux-$arch.zip"
  built+=("miren-linux-$arch.zip")
else
  cd "$root"
  target_dir="$("$cargo" metadata --format-version 1 --no-deps --locked |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
  echo "    $("$cargo" --version), $(rustc --version)"
  for arch in amd64 arm64; do
    triple="$(triple_of "$arch")"
    args=(build --locked --profile "$profile" -p cli --bin miren)
    if [ "$arch" = "$host_arch" ]; then
      bin="$target_dir/$profile_dir/miren"
    else
      gcc="${triple%%-*}-linux-gnu-gcc"
      if ! rustup target list --installed 2>/dev/null | grep -qx "$triple"; then
        echo "==> skipping miren-linux-$arch.zip: the Rust target $triple is not installed here (rustup target add $triple, and $gcc); the release workflow builds it on its own $arch runner"
        continue
      fi
      if ! command -v "$gcc" >/dev/null; then
        echo "==> skipping miren-linux-$arch.zip: no cross C compiler $gcc (Debian: gcc-${triple%%-*}-linux-gnu); the release workflow builds it on its own $arch runner"
        continue
      fi
      upper="$(echo "$triple" | tr 'a-z-' 'A-Z_')"
      export "CARGO_TARGET_${upper}_LINKER=$gcc" "CC_${triple//-/_}=$gcc" "AR_${triple//-/_}=${gcc%-gcc}-ar"
      args+=(--target "$triple")
      bin="$target_dir/$triple/$profile_dir/miren"
    fi
    echo "==> $cargo ${args[*]}"
    "$cargo" "${args[@]}"
    check_version "$bin" "$arch" "$commit"
    pack "$bin" "$out_dir/miren-linux-$arch.zip"
    built+=("miren-linux-$arch.zip")
  done
fi

(cd "$out_dir" && LC_ALL=C sha256sum "${built[@]}" >SHA256SUMS.partial && mv SHA256SUMS.partial SHA256SUMS)
echo "==> $out_dir:"
(cd "$out_dir" && ls -l "${built[@]}" SHA256SUMS && cat SHA256SUMS)
