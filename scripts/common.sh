# shellcheck shell=bash
# Shared helpers for scripts/setup.sh and scripts/build-criu.sh (sourced, not run).
#
# The temporary apt area: newer Debian suites (trixie, sid) are read through a private apt
# configuration (own sources list, own lists, own cache, under one temporary directory), so the
# system's sources and package lists never learn of them. Nothing is ever *installed* from there:
# we only `apt-get download` / `apt-get source --download-only` and unpack by hand.

: "${KYB_QUIET:=0}"
KYB_DEPS=${KYB_DEPS:-/opt/kybernate-deps}
KYB_DEBIAN_MIRROR=${KYB_DEBIAN_MIRROR:-http://deb.debian.org/debian}

say() { echo "setup: $*"; }
# Printed only when not quiet: steps that found their result already in place.
note() { [ "$KYB_QUIET" = 1 ] || echo "setup: $*"; }
die() { echo "setup: ERROR: $*" >&2; exit 1; }

now() { date +%s.%N; }
# elapsed START -> "12.3s"
elapsed() { awk -v s="$1" -v e="$(now)" 'BEGIN { printf "%.1fs", e - s }'; }

# Packages of the list that dpkg does not report as installed.
missing_packages() {
    local p out=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || out+=("$p")
    done
    echo "${out[@]}"
}

# The system's package lists are refreshed at most once per run, and only when something is missing.
_kyb_system_apt_updated=0
apt_install() {
    local missing
    missing=$(missing_packages "$@")
    [ -n "$missing" ] || return 0
    if [ "$_kyb_system_apt_updated" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        _kyb_system_apt_updated=1
    fi
    local log
    log=$(mktemp)
    # shellcheck disable=SC2086
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        die "apt-get install $missing failed"
    fi
    rm -f "$log"
    say "installed (bookworm): $missing"
}

# temp_apt_init: make (or reuse, via KYB_TEMP_APT_DIR) the private apt area and fill its lists.
# Sets TEMP_APT (array of apt options). The caller that created it removes it with temp_apt_cleanup.
TEMP_APT=()
_kyb_temp_apt_owner=0
temp_apt_init() {
    [ ${#TEMP_APT[@]} -eq 0 ] || return 0
    if [ -z "${KYB_TEMP_APT_DIR:-}" ] || [ ! -e "$KYB_TEMP_APT_DIR/updated" ]; then
        KYB_TEMP_APT_DIR=$(mktemp -d /var/tmp/kybernate-apt.XXXXXX)
        _kyb_temp_apt_owner=1
    fi
    export KYB_TEMP_APT_DIR
    local d=$KYB_TEMP_APT_DIR
    mkdir -p "$d/lists/partial" "$d/cache/archives/partial" "$d/parts.d" "$d/prefs.d"
    TEMP_APT=(-o "Dir::Etc::SourceList=$d/sources.list" -o "Dir::Etc::SourceParts=$d/parts.d"
              -o "Dir::Etc::Preferences=$d/preferences" -o "Dir::Etc::PreferencesParts=$d/prefs.d"
              -o "Dir::State::Lists=$d/lists" -o "Dir::Cache=$d/cache"
              -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache="
              -o "APT::Sandbox::User=root" -o "Acquire::Languages=none")
    if [ ! -e "$d/updated" ]; then
        cat >"$d/sources.list" <<EOF
deb $KYB_DEBIAN_MIRROR trixie main
deb $KYB_DEBIAN_MIRROR sid main
deb-src $KYB_DEBIAN_MIRROR trixie main
EOF
        local t0; t0=$(now)
        apt-get "${TEMP_APT[@]}" update -qq || die "apt-get update of the temporary trixie/sid lists failed"
        touch "$d/updated"
        say "temporary apt lists (trixie, sid, trixie deb-src) in $d ($(elapsed "$t0"))"
    fi
}

# temp_apt_download PACKAGE/SUITE: print the path of its .deb, downloaded once per temporary area.
# Called as $(temp_apt_download ...), i.e. in a subshell: temp_apt_init must have run before.
temp_apt_download() {
    [ ${#TEMP_APT[@]} -gt 0 ] || die "temp_apt_download before temp_apt_init"
    local d="$KYB_TEMP_APT_DIR/debs/${1//\//_}"
    if ! ls "$d"/*.deb >/dev/null 2>&1; then
        mkdir -p "$d"
        (cd "$d" && apt-get "${TEMP_APT[@]}" download -qq "$1" >/dev/null) || die "apt-get download $1 failed"
    fi
    ls "$d"/*.deb | head -n1
}

temp_apt_cleanup() {
    if [ "$_kyb_temp_apt_owner" = 1 ] && [ -n "${KYB_TEMP_APT_DIR:-}" ]; then
        rm -rf "$KYB_TEMP_APT_DIR"
        _kyb_temp_apt_owner=0
        TEMP_APT=()
    fi
}

# The first CRIU on PATH (with /usr/local/sbin first, as the harness gives containerd) that is
# version 4 or newer and passes `criu check`; empty when there is none.
working_criu4() {
    local c ver
    for c in /usr/local/sbin/criu /usr/sbin/criu $(command -v criu 2>/dev/null); do
        [ -x "$c" ] || continue
        ver=$("$c" --version 2>/dev/null | sed -n 's/^Version: \([0-9]*\)\..*/\1/p')
        [ -n "$ver" ] && [ "$ver" -ge 4 ] || continue
        "$c" check >/dev/null 2>&1 || continue
        echo "$c"
        return 0
    done
    return 0
}
