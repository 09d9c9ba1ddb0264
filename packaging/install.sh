#!/usr/bin/env bash
# install.sh: install or upgrade the appliance from this offline bundle. No network, no compiler.
#
# Usage: sudo ./install.sh [options]
#   --prefix DIR        program folder (default /opt/appliance)
#   --root DIR          install everything under DIR (/opt, /etc, /var/lib, /run and the unit), as
#                       for a staging tree or a test; implies --no-systemd
#   --service-user NAME user (and group) the service runs as (default appliance; created if missing)
#   --memory-max SIZE   the service's MemoryMax= (systemd syntax: 6G, 75%); default on first
#                       install 75%; an upgrade keeps the current value unless this is given
#   --gpu | --no-gpu    give the service NVIDIA device access (drop-in 20-gpu.conf) or remove it
#   --python PY         Python to build the venv with (default python3; must match the bundle's)
#   --no-systemd        install the unit file but do not run systemctl
#   --no-start          enable the unit but do not (re)start it
#   -h, --help          this text
#
# Idempotent: running it again changes nothing. Running a newer bundle upgrades in place: a new
# release folder is built beside the old one, /opt/appliance/current is switched to it and the
# service restarted; /etc/appliance and /var/lib/appliance (config, ledger, history, cache) are kept.
set -euo pipefail
umask 022  # the service user must read the program; config and data get their own modes below

BUNDLE=$(cd "$(dirname "$0")" && pwd)
PREFIX=/opt/appliance CONFDIR=/etc/appliance STATEDIR=/var/lib/appliance RUNDIR=/run/appliance
UNITDIR=/etc/systemd/system
ROOT="" SERVICE_USER=appliance MEMORY_MAX="" GPU="" PY=python3 SYSTEMD=1 START=1

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }
usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) PREFIX="${2:?--prefix needs a folder}"; shift 2 ;;
        --root) ROOT="${2:?--root needs a folder}"; SYSTEMD=0; shift 2 ;;
        --service-user) SERVICE_USER="${2:?--service-user needs a name}"; shift 2 ;;
        --memory-max) MEMORY_MAX="${2:?--memory-max needs a size}"; shift 2 ;;
        --gpu) GPU=yes; shift ;;
        --no-gpu) GPU=no; shift ;;
        --python) PY="${2:?--python needs a program}"; shift 2 ;;
        --no-systemd) SYSTEMD=0; shift ;;
        --no-start) START=0; shift ;;
        -h|--help) usage 0 ;;
        *) echo "install.sh: unknown option $1" >&2; usage 2 ;;
    esac
done
if [ -n "$ROOT" ]; then
    mkdir -p "$ROOT"
    ROOT=$(cd "$ROOT" && pwd)
    PREFIX="$ROOT$PREFIX" CONFDIR="$ROOT$CONFDIR" STATEDIR="$ROOT$STATEDIR" RUNDIR="$ROOT$RUNDIR" UNITDIR="$ROOT$UNITDIR"
fi
case "$PREFIX" in /*) ;; *) die "--prefix must be an absolute path, got $PREFIX" ;; esac
IS_ROOT=0
[ "$(id -u)" -eq 0 ] && IS_ROOT=1

# ---------------------------------------------------------------- the bundle is whole
say "checking the bundle's sha256 sums"
(cd "$BUNDLE" && sha256sum --check --quiet --strict SHA256SUMS) || die "the bundle is damaged (sha256 mismatch above); copy it again"
VERSION=$(sed -n 's/^version=//p' "$BUNDLE/BUNDLE")
BUNDLE_PY=$(sed -n 's/^python=//p' "$BUNDLE/BUNDLE")
RELEASE_ID="$VERSION-$(sha256sum "$BUNDLE/SHA256SUMS" | cut -c1-12)"

command -v "$PY" >/dev/null || die "no $PY: install Python $BUNDLE_PY with its venv module (Debian: python$BUNDLE_PY-venv)"
HAVE_PY=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
[ "$HAVE_PY" = "$BUNDLE_PY" ] || die "the wheels are for Python $BUNDLE_PY but $PY is $HAVE_PY; pass --python python$BUNDLE_PY"
"$PY" -c 'import ensurepip, venv' 2>/dev/null || die "$PY has no venv/ensurepip module (Debian: apt install python$BUNDLE_PY-venv)"

# ---------------------------------------------------------------- the service user
if ! getent passwd "$SERVICE_USER" >/dev/null; then
    if [ "$IS_ROOT" -ne 1 ] || [ -n "$ROOT" ]; then
        die "user $SERVICE_USER does not exist; run as root (without --root) to create it, or pass --service-user"
    fi
    say "creating system user $SERVICE_USER"
    useradd --system --user-group --home-dir "$STATEDIR" --no-create-home --shell /usr/sbin/nologin \
        --comment "appliance LLM service" "$SERVICE_USER"
fi
SERVICE_GROUP=$(id -gn "$SERVICE_USER")
own() { if [ "$IS_ROOT" -eq 1 ]; then chown "$@"; fi; }

# ---------------------------------------------------------------- the release: venv + models
RELEASE="$PREFIX/releases/$RELEASE_ID"
if [ -f "$RELEASE/.complete" ]; then
    say "release $RELEASE_ID is already installed in $RELEASE"
else
    say "installing release $RELEASE_ID into $RELEASE (venv from the bundle's wheels only)"
    rm -rf "$RELEASE"
    mkdir -p "$RELEASE"
    "$PY" -m venv "$RELEASE/venv"
    # no index at all, and no site or user pip config that could name one
    PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
        "$RELEASE/venv/bin/python" -m pip install --quiet --no-index --find-links "$BUNDLE/wheelhouse" \
        --only-binary :all: --requirement "$BUNDLE/requirements.txt"
    mkdir -p "$RELEASE/models" "$RELEASE/docs"
    cp "$BUNDLE"/models/*.gguf "$RELEASE/models/"
    cp "$BUNDLE"/docs/* "$RELEASE/docs/"
    cp "$BUNDLE/systemd/appliance.service" "$BUNDLE/config/appliance.toml" "$BUNDLE/uninstall.sh" "$RELEASE/"
    chmod -R go-w "$RELEASE"
    chmod 0755 "$RELEASE"
    say "checking the installed models' sha256"
    (cd "$RELEASE" && grep '  models/' "$BUNDLE/SHA256SUMS" | sha256sum --check --quiet --strict) \
        || die "a model copied into $RELEASE/models does not match its sha256 (disk full or failing?)"
    # the manifest check as the service does it (also records the verified hash for `appliance doctor`)
    home=$(mktemp -d)
    ln -s "$RELEASE/models" "$home/models"
    APPLIANCE_HOME="$home" "$RELEASE/venv/bin/appliance" models verify >/dev/null \
        || { rm -rf "$home"; die "the models do not match the appliance's manifest"; }
    rm -rf "$home"
    touch "$RELEASE/.complete"
fi
ln -sfn "releases/$RELEASE_ID" "$PREFIX/current.new"
mv -T "$PREFIX/current.new" "$PREFIX/current"

# ---------------------------------------------------------------- config, data and socket folders
mkdir -p "$CONFDIR" "$STATEDIR/state" "$RUNDIR"
chmod 0750 "$CONFDIR" "$STATEDIR" "$STATEDIR/state" "$RUNDIR"
own "root:$SERVICE_GROUP" "$CONFDIR"
own "$SERVICE_USER:$SERVICE_GROUP" "$STATEDIR" "$STATEDIR/state" "$RUNDIR"
relocate() {  # the bundle's default paths, under --root/--prefix when given
    sed -e "s#/opt/appliance#$PREFIX#g" -e "s#/etc/appliance#$CONFDIR#g" \
        -e "s#/var/lib/appliance#$STATEDIR#g" -e "s#/run/appliance#$RUNDIR#g" "$@"
}
relocate "$BUNDLE/config/appliance.toml" > "$CONFDIR/appliance.toml.default"
if [ ! -f "$CONFDIR/appliance.toml" ]; then
    say "writing the default config $CONFDIR/appliance.toml"
    cp "$CONFDIR/appliance.toml.default" "$CONFDIR/appliance.toml"
else
    say "keeping the config $CONFDIR/appliance.toml (new defaults: appliance.toml.default)"
fi
chmod 0640 "$CONFDIR/appliance.toml" "$CONFDIR/appliance.toml.default"
own "root:$SERVICE_GROUP" "$CONFDIR/appliance.toml" "$CONFDIR/appliance.toml.default"
ln -sfn "$PREFIX/current/models" "$STATEDIR/models"

# ---------------------------------------------------------------- the unit and its drop-ins
mkdir -p "$UNITDIR/appliance.service.d"
relocate "$BUNDLE/systemd/appliance.service" \
    | sed -e "s/^User=appliance$/User=$SERVICE_USER/" -e "s/^Group=appliance$/Group=$SERVICE_GROUP/" \
    > "$UNITDIR/appliance.service"
chmod 0644 "$UNITDIR/appliance.service"
MEM_DROPIN="$UNITDIR/appliance.service.d/10-memory.conf"
if [ -n "$MEMORY_MAX" ] || [ ! -f "$MEM_DROPIN" ]; then
    printf '# written by install.sh (--memory-max); the service is killed and restarted above this\n[Service]\nMemoryMax=%s\n' \
        "${MEMORY_MAX:-75%}" > "$MEM_DROPIN"
fi
GPU_DROPIN="$UNITDIR/appliance.service.d/20-gpu.conf"
if [ "$GPU" = yes ]; then
    cat > "$GPU_DROPIN" <<'GPUEOF'
# written by install.sh --gpu: NVIDIA device nodes for the service (remove with install.sh --no-gpu)
[Service]
PrivateDevices=no
DeviceAllow=char-nvidiactl rw
DeviceAllow=char-nvidia-frontend rw
DeviceAllow=char-nvidia-uvm rw
DeviceAllow=char-nvidia-caps rw
# the CUDA driver JIT-compiles kernels into writable+executable memory
MemoryDenyWriteExecute=no
GPUEOF
elif [ "$GPU" = no ]; then
    rm -f "$GPU_DROPIN"
fi

# ---------------------------------------------------------------- systemd
if [ "$SYSTEMD" -eq 1 ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable appliance.service
    if [ "$START" -eq 1 ]; then
        systemctl restart appliance.service
        say "started; \`systemctl status appliance\` and \`journalctl -u appliance\` show how it goes"
    fi
elif [ "$SYSTEMD" -eq 1 ]; then
    say "systemd is not running on this machine (no /run/systemd/system): the unit is installed in"
    say "$UNITDIR but not enabled or started; on a systemd host: systemctl daemon-reload && systemctl enable --now appliance"
else
    say "not calling systemctl (--root or --no-systemd)"
fi

# ---------------------------------------------------------------- keep this release and the one before
keep_prev=""
for old in "$PREFIX"/releases/*; do
    name=$(basename "$old")
    if [ "$name" != "$RELEASE_ID" ] && { [ -z "$keep_prev" ] || [ "$old" -nt "$PREFIX/releases/$keep_prev" ]; }; then
        keep_prev=$name
    fi
done
for old in "$PREFIX"/releases/*; do
    name=$(basename "$old")
    if [ "$name" != "$RELEASE_ID" ] && [ "$name" != "$keep_prev" ]; then
        rm -rf "$old"
    fi
done
say "installed appliance $VERSION in $PREFIX/current; check it with:"
say "  APPLIANCE_HOME=$STATEDIR $PREFIX/current/venv/bin/appliance doctor -c $CONFDIR/appliance.toml"
