#!/usr/bin/env bash
# Developer/CI set-up for Kybernate on a Debian bookworm host, as root. Idempotent: every step first
# checks whether its result is already in place and skips itself if so.
#
#   1. bookworm packages: containerd 1.6, runc 1.1, busybox-static, build tools, Go proto sources,
#      docker-registry (distribution 2.8: the checkpoint tiers' tests start one on 127.0.0.1),
#      buildah and debootstrap (tests/integration/test_packaging_image.py builds packaging/Containerfile)
#   2. containerd 1.7 (trixie), containerd 2.1 and runc 1.3 (sid): .debs downloaded through a private,
#      temporary apt configuration and unpacked with `dpkg -x` under /opt/kybernate-deps
#      (never installed; the system's apt sources and lists stay untouched)
#   3. CRIU 4 built from source (scripts/build-criu.sh) when no CRIU >= 4 passes `criu check`
#   4. the Python venv REPO/.venv with the package installed editable (`.[test,dev]`)
#
# Usage: scripts/setup.sh [--quiet]     (--quiet: print only what was done, and a one-line summary)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/common.sh
. "$REPO/scripts/common.sh"
[ "${1:-}" = "--quiet" ] && KYB_QUIET=1
export KYB_QUIET

[ "$(id -u)" = 0 ] || die "setup.sh must run as root (it installs packages and builds CRIU)"
. /etc/os-release
[ "${VERSION_CODENAME:-}" = bookworm ] || say "warning: written for Debian bookworm, this is ${PRETTY_NAME:-unknown}"
trap temp_apt_cleanup EXIT
t_all=$(now)

# ---- 1. bookworm packages --------------------------------------------------------------------
SYSTEM_PACKAGES=(containerd runc iptables busybox-static python3-venv python3-dev gcc make git psmisc
                 iproute2 ca-certificates xz-utils patchelf
                 golang-github-containerd-containerd-dev golang-github-containerd-ttrpc-dev
                 golang-github-gogo-protobuf-dev docker-registry buildah debootstrap)
t0=$(now)
if [ -z "$(missing_packages "${SYSTEM_PACKAGES[@]}")" ]; then
    note "bookworm packages: all present"
else
    apt_install "${SYSTEM_PACKAGES[@]}"
    say "bookworm packages ($(elapsed "$t0"))"
fi
# docker-registry (CNCF distribution 2.8) is for the tier tests, which start their own on 127.0.0.1: the
# package's own service (every address, port 5000) is not wanted where systemd would start it
if [ -d /run/systemd/system ] && systemctl is-enabled docker-registry >/dev/null 2>&1; then
    systemctl disable --now docker-registry >/dev/null 2>&1 && say "docker-registry: its system service disabled"
fi

# ---- 2. containerd 1.7 / 2.1, runc 1.3 from newer suites, unpacked only ------------------------
# binary_version DIR -> the version its containerd or runc prints, empty when it does not run (never fails)
binary_version() {
    local d=$1
    if [ -x "$d/usr/bin/containerd" ]; then
        "$d/usr/bin/containerd" --version 2>/dev/null | awk '{print $3}' || true
    elif [ -x "$d/usr/sbin/runc" ]; then
        "$d/usr/sbin/runc" --version 2>/dev/null | awk 'NR==1 {print $3}' || true
    fi
}

# A newer suite moves on (sid will not keep containerd 2.1 for ever): that must not stop the set-up of
# everything else. The version is left out, its integration tests skip saying why, and the summary
# says so; KYB_STRICT_DEPS=1 makes it an error instead.
dep_unavailable() {
    [ "${KYB_STRICT_DEPS:-0}" = 1 ] && die "$2"
    echo "setup: WARNING: $1 left out: $2 (its integration tests will be skipped)" >&2
}

# unpack_dep NAME PACKAGE/SUITE VERSION-PREFIX: /opt/kybernate-deps/NAME from that suite's .deb.
# DEBIAN-VERSION is written last: a directory without it is an interrupted unpack and is redone.
unpack_dep() {
    local name=$1 pkgsuite=$2 want=$3 dir="$KYB_DEPS/$1" have t0 deb debver
    have=$(binary_version "$dir")
    if [ -e "$dir/DEBIAN-VERSION" ]; then
        case "$have" in
            "$want"*) note "$name: $have already in $dir"; return 0 ;;
        esac
    fi
    t0=$(now)
    temp_apt_init
    deb=$(temp_apt_download "$pkgsuite")
    debver=$(dpkg-deb -f "$deb" Version)
    case "$debver" in
        *:"$want"*|"$want"*) ;;
        *) dep_unavailable "$name" "$pkgsuite is now $debver, not $want.x; pin another source for $name"
           return 0 ;;
    esac
    rm -rf "$dir"
    mkdir -p "$dir"
    dpkg -x "$deb" "$dir"
    have=$(binary_version "$dir")
    if [ -z "$have" ] && [ -x "$dir/usr/sbin/runc" ]; then
        private_glibc "$dir" "$dir/usr/sbin/runc" libc6/sid libseccomp2/sid
        have=$(binary_version "$dir")
    fi
    case "$have" in
        "$want"*) ;;
        *) rm -rf "$dir"
           dep_unavailable "$name" "$name from $(basename "$deb") does not run here (got '${have}')"
           return 0 ;;
    esac
    echo "$debver" >"$dir/DEBIAN-VERSION"
    say "$name: unpacked $(basename "$deb") into $dir, runs as $have ($(elapsed "$t0"))"
}

# private_glibc DIR BINARY PACKAGE/SUITE...: sid's runc needs glibc >= 2.38 (bookworm has 2.36).
# The libraries of the given packages are unpacked into DIR/glibc and BINARY's ELF interpreter and
# RUNPATH are pointed there (patchelf), so the binary, and the copies of itself it re-executes
# (`runc init`), load sid's glibc while the rest of the system keeps its own.
private_glibc() {
    local dir=$1 bin=$2 p lib
    shift 2
    for p in "$@"; do
        dpkg -x "$(temp_apt_download "$p")" "$dir/glibc"
    done
    lib="$dir/glibc/usr/lib/x86_64-linux-gnu"
    [ -e "$lib/ld-linux-x86-64.so.2" ] || die "no ld-linux-x86-64.so.2 in $lib"
    patchelf --set-interpreter "$lib/ld-linux-x86-64.so.2" --set-rpath "$lib" "$bin"
    say "$(basename "$bin"): bundled glibc $(dpkg-deb -f "$(temp_apt_download libc6/sid)" Version) in $dir/glibc (patchelf)"
}

mkdir -p "$KYB_DEPS"
unpack_dep containerd-1.7 containerd/trixie 1.7.
unpack_dep containerd-2.1 containerd/sid 2.1.
unpack_dep runc-1.3 runc/sid 1.3.

# ---- 3. CRIU 4 ----------------------------------------------------------------------------------
t0=$(now)
criu=$(working_criu4)
if [ "$criu" = /usr/local/sbin/criu ] && bash "$REPO/scripts/build-criu.sh" --check-only; then
    note "CRIU: $criu ($("$criu" --version | sed -n 's/^Version: //p')) passes criu check and has our patches"
else
    [ -x /usr/sbin/criu ] && ! /usr/sbin/criu check >/dev/null 2>&1 &&
        say "CRIU: /usr/sbin/criu $(/usr/sbin/criu --version | sed -n 's/^Version: //p') fails criu check; building CRIU 4"
    [ -n "$criu" ] && say "CRIU: $criu lacks our patches (scripts/criu-patches); building CRIU 4"
    bash "$REPO/scripts/build-criu.sh"
    criu=$(working_criu4)
    [ -n "$criu" ] || die "no working CRIU >= 4 after build-criu.sh"
    say "CRIU ($(elapsed "$t0"))"
fi

# ---- 4. Python venv -----------------------------------------------------------------------------
VENV="$REPO/.venv"
stamp_file="$VENV/.kybernate-setup-stamp"
# the shim's script is copied into the venv at install (setup.cfg's scripts), so a change to it reinstalls too
stamp=$(cat "$REPO/setup.cfg" "$REPO/pyproject.toml" "$REPO/bin/containerd-shim-kybernate-v1" | sha256sum | cut -d' ' -f1)
t0=$(now)
if ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    rm -rf "$VENV"
    /usr/bin/python3 -m venv "$VENV"
    say "created $VENV with $("$VENV/bin/python" --version)"
fi
if [ "$(cat "$stamp_file" 2>/dev/null)" = "$stamp" ] &&
   [ -x "$VENV/bin/containerd-shim-kybernate-v1" ] &&
   "$VENV/bin/python" -m pip show -q kybernate >/dev/null 2>&1; then
    note "venv: kybernate installed editable in $VENV, setup.cfg unchanged"
else
    (cd "$REPO" && "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test,dev]' --config-settings editable_mode=compat) ||
        die "pip install -e '.[test,dev]' failed"
    echo "$stamp" >"$stamp_file"
    say "venv: pip install -e '.[test,dev]' ($(elapsed "$t0"))"
fi

temp_apt_cleanup

# ---- summary ------------------------------------------------------------------------------------
v_c16=$(/usr/bin/containerd --version | awk '{print $3}')
v_c17=$(binary_version "$KYB_DEPS/containerd-1.7")
v_c21=$(binary_version "$KYB_DEPS/containerd-2.1")
v_r11=$(/usr/sbin/runc --version | awk 'NR==1 {print $3}')
v_r13=$(binary_version "$KYB_DEPS/runc-1.3")
v_criu=$("$criu" --version | sed -n 's/^Version: //p')
v_py=$("$VENV/bin/python" --version | awk '{print $2}')
if [ "$KYB_QUIET" = 1 ]; then
    say "ready in $(elapsed "$t_all"): containerd $v_c16/$v_c17/$v_c21, runc $v_r11/$v_r13, criu $v_criu, python $v_py"
else
    cat <<EOF
setup: done in $(elapsed "$t_all")
  containerd 1.6  $v_c16  /usr/bin/containerd
  containerd 1.7  $v_c17  $KYB_DEPS/containerd-1.7/usr/bin/containerd
  containerd 2.1  $v_c21  $KYB_DEPS/containerd-2.1/usr/bin/containerd
  runc            $v_r11  /usr/sbin/runc
  runc            $v_r13  $KYB_DEPS/runc-1.3/usr/sbin/runc
  criu            $v_criu  $criu
  python (venv)   $v_py  $VENV/bin/python
  shim            $VENV/bin/containerd-shim-kybernate-v1
EOF
fi
