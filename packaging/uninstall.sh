#!/usr/bin/env bash
# uninstall.sh: remove the appliance program and its systemd unit. Config (/etc/appliance) and data
# (/var/lib/appliance: ledger, history, semantic cache) are KEPT unless --purge is given.
#
# Usage: sudo ./uninstall.sh [options]
#   --prefix DIR        program folder (default /opt/appliance)
#   --root DIR          the tree install.sh --root used; implies --no-systemd
#   --service-user NAME the service's user (default appliance); --purge deletes it
#   --purge             also delete config, data and the service user
#   --no-systemd        do not run systemctl
#   -h, --help          this text
set -euo pipefail

PREFIX=/opt/appliance CONFDIR=/etc/appliance STATEDIR=/var/lib/appliance RUNDIR=/run/appliance
UNITDIR=/etc/systemd/system
ROOT="" SERVICE_USER=appliance PURGE=0 SYSTEMD=1

say() { echo "uninstall.sh: $*"; }
usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) PREFIX="${2:?--prefix needs a folder}"; shift 2 ;;
        --root) ROOT="${2:?--root needs a folder}"; SYSTEMD=0; shift 2 ;;
        --service-user) SERVICE_USER="${2:?--service-user needs a name}"; shift 2 ;;
        --purge) PURGE=1; shift ;;
        --no-systemd) SYSTEMD=0; shift ;;
        -h|--help) usage 0 ;;
        *) echo "uninstall.sh: unknown option $1" >&2; usage 2 ;;
    esac
done
if [ -n "$ROOT" ]; then
    ROOT=$(cd "$ROOT" && pwd)
    PREFIX="$ROOT$PREFIX" CONFDIR="$ROOT$CONFDIR" STATEDIR="$ROOT$STATEDIR" RUNDIR="$ROOT$RUNDIR" UNITDIR="$ROOT$UNITDIR"
fi

if [ "$SYSTEMD" -eq 1 ] && [ -d /run/systemd/system ]; then
    systemctl disable --now appliance.service 2>/dev/null || true
elif [ "$SYSTEMD" -eq 1 ]; then
    say "systemd is not running here: nothing to stop"
fi
rm -rf "$UNITDIR/appliance.service" "$UNITDIR/appliance.service.d"
if [ "$SYSTEMD" -eq 1 ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
rm -rf "$PREFIX"
rm -f "$STATEDIR/models"  # the link into the program folder
rm -rf "$RUNDIR"
say "removed the program ($PREFIX) and the unit"

if [ "$PURGE" -eq 1 ]; then
    rm -rf "$CONFDIR" "$STATEDIR"
    say "purged config ($CONFDIR) and data ($STATEDIR)"
    if [ -z "$ROOT" ] && getent passwd "$SERVICE_USER" >/dev/null; then
        userdel "$SERVICE_USER" && say "deleted user $SERVICE_USER"
    fi
else
    say "kept config ($CONFDIR) and data ($STATEDIR); --purge deletes them"
fi
