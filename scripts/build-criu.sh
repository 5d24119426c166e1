#!/usr/bin/env bash
# Build CRIU 4 from Debian trixie's upstream tarball and install it as /usr/local/sbin/criu (plus the
# CUDA plugin in /usr/local/lib/criu), for hosts where the installed CRIU fails `criu check`
# (bookworm's 3.17 cannot parse the vDSO of recent kernels). runc looks `criu` up in PATH, where
# /usr/local/sbin precedes /usr/sbin.
#
# Usage: scripts/build-criu.sh [--force | --check-only]
#   without --force it does nothing when /usr/local/sbin/criu already passes `criu check` and was built
#   with every patch in scripts/criu-patches; --check-only: exit status 0 if so, 1 if a build is due.
# Only trixie's *source* is read (apt-get source --download-only); nothing is installed from trixie.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=scripts/common.sh
. "$HERE/common.sh"

[ "$(id -u)" = 0 ] || die "build-criu.sh needs root"
force=0
[ "${1:-}" = "--force" ] && force=1
check_only=0
[ "${1:-}" = "--check-only" ] && check_only=1

# Our patches on top of the tarball (scripts/criu-patches/*.patch, applied in name order); the names
# of those applied are recorded in $PATCH_STAMP so that a host built before a patch existed rebuilds.
PATCH_DIR="$HERE/criu-patches"
PATCH_STAMP=/usr/local/share/kybernate/criu-patches
patches_applied() {
    local p
    for p in "$PATCH_DIR"/*.patch; do
        [ -e "$p" ] || continue
        grep -qxF "$(basename "$p")" "$PATCH_STAMP" 2>/dev/null || return 1
    done
    return 0
}

if [ "$force" = 0 ] && [ "$(working_criu4)" = /usr/local/sbin/criu ] && patches_applied; then
    [ "$check_only" = 1 ] || note "CRIU: $(working_criu4) passes criu check and has our patches; nothing to build"
    exit 0
fi
[ "$check_only" = 0 ] || exit 1

# What `make criu` and the CUDA plugin need (trixie's Build-Depends minus docs and Python packaging).
BUILD_DEPS=(gcc make pkg-config xz-utils libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler
            protobuf-compiler python3-protobuf libnl-3-dev libcap-dev libnet1-dev libaio-dev
            libgnutls28-dev libbsd-dev uuid-dev libnftables-dev iptables patch)
t0=$(now)
apt_install "${BUILD_DEPS[@]}"
say "CRIU build dependencies present ($(elapsed "$t0"))"

workdir=$(mktemp -d /var/tmp/kybernate-criu.XXXXXX)
cleanup() { rm -rf "$workdir"; temp_apt_cleanup; }
trap cleanup EXIT

temp_apt_init
t0=$(now)
# The Debian tarball/dsc may be missing from the mirror; the orig tarball is what we build, and apt
# has checked its SHA256 against the Sources index before keeping it.
(cd "$workdir" && apt-get "${TEMP_APT[@]}" source --download-only -qq criu/trixie >/dev/null 2>&1) || true
tarball=$(ls "$workdir"/criu_*.orig.tar.* 2>/dev/null | head -n1)
[ -n "$tarball" ] || die "apt-get source --download-only criu/trixie brought no orig tarball"
say "downloaded $(basename "$tarball") ($(elapsed "$t0"))"

tar -C "$workdir" -xf "$tarball"
src=$(find "$workdir" -mindepth 1 -maxdepth 1 -type d -name 'criu-*' | head -n1)
[ -n "$src" ] || die "no criu-* directory in $tarball"
applied=()
for p in "$PATCH_DIR"/*.patch; do
    [ -e "$p" ] || continue
    case "$(basename "$src")" in
        criu-4.1.*)   # our patches are for 4.1.x; 4.2 carries its own fix of the same problem
            patch -d "$src" -p1 --quiet --forward <"$p" ||
                die "CRIU patch $(basename "$p") does not apply to $(basename "$src")" ;;
        *) say "$(basename "$p") is for CRIU 4.1.x; $(basename "$src") builds without it" ;;
    esac
    applied+=("$(basename "$p")")
done
[ ${#applied[@]} -eq 0 ] || say "applied ${applied[*]}"

t0=$(now)
log="$workdir/build.log"
if ! make -C "$src" -j"$(nproc)" PREFIX=/usr/local criu >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    die "CRIU build failed (log above)"
fi
install -D -m 0755 "$src/criu/criu" /usr/local/sbin/criu
mkdir -p "$(dirname "$PATCH_STAMP")"
printf '%s\n' "${applied[@]}" >"$PATCH_STAMP"
say "built and installed /usr/local/sbin/criu ($(/usr/local/sbin/criu --version | sed -n 's/^Version: //p')) ($(elapsed "$t0"))"

# The CUDA plugin (CRIU calls cuda-checkpoint through it) is for GPU hosts; a failure here is not fatal.
if make -C "$src" PREFIX=/usr/local cuda_plugin >>"$log" 2>&1; then
    install -D -m 0755 "$src/plugins/cuda/cuda_plugin.so" /usr/local/lib/criu/cuda_plugin.so
    say "installed /usr/local/lib/criu/cuda_plugin.so"
else
    say "warning: CRIU's cuda_plugin did not build (not needed without a GPU)"
fi

if ! check_output=$(/usr/local/sbin/criu check 2>&1); then
    echo "$check_output" >&2
    die "/usr/local/sbin/criu check fails"
fi
say "/usr/local/sbin/criu check: $check_output"
