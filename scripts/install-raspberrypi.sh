#!/usr/bin/env bash
# Install the Madevo Edge Agent as a systemd service on a Debian-like gateway (Raspberry Pi OS,
# Debian, Ubuntu; arm64, armv7, x86_64). Run as root. Safe to run again: it upgrades the
# package and the unit, and never touches an existing config or token unless told to.
#
#   sudo scripts/install-raspberrypi.sh [--token-file FILE] [--start]
#   sudo scripts/install-raspberrypi.sh --uninstall [--purge]
#
# What goes where:
#   /opt/edge-agent/venv                   virtualenv with the agent (edge-agent command)
#   /etc/edge-agent/config.toml            from configs/serial-sensor.toml, only when missing
#   /etc/edge-agent/token                  the upload token (0600, edge-agent)
#   /var/lib/edge-agent                    data_dir: the SQLite buffer (0750, edge-agent)
#   /etc/systemd/system/edge-agent.service from scripts/edge-agent.service
#   /etc/modules-load.d/edge-agent.conf    USB serial drivers loaded at boot
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: install-raspberrypi.sh [OPTIONS]

Install (or upgrade) the Madevo Edge Agent as the systemd service edge-agent.

  --source PATH      install the agent from this checkout or wheel
                     (default: the checkout this script lives in)
  --token-file FILE  install the upload token from FILE (replaces the current one);
                     the environment variable EDGE_AGENT_TOKEN works too
  --start            start (or restart) the service now; without it a running
                     service is restarted, a stopped one is left stopped
  --no-pip           create the virtualenv but do not pip install the agent into it
  --root DIR         install under DIR instead of / (no user, no ownership, no
                     systemctl): to inspect the result or build an image
  --uninstall        remove the service, the virtualenv and the user edge-agent;
                     keep /etc/edge-agent and /var/lib/edge-agent (the buffer)
  --purge            with --uninstall: remove those too, unsent readings included
  -h, --help         this help

Environment: PYTHON (default python3, 3.11 or newer), EDGE_AGENT_TOKEN.
EOF
}

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CHECKOUT="$(cd "$HERE/.." && pwd)"
PYTHON="${PYTHON:-python3}"
SERVICE_USER=edge-agent
SOURCE="$CHECKOUT"
ROOT=""
TOKEN_FILE=""
START=0
PIP=1
UNINSTALL=0
PURGE=0
BUILD_DIR=""
CONFIG_OK=1
trap '[ -z "$BUILD_DIR" ] || rm -rf "$BUILD_DIR"' EXIT

say() { printf '==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
warn() { printf 'install-raspberrypi.sh: warning: %s\n' "$*" >&2; }
die() {
  printf 'install-raspberrypi.sh: error: %s\n' "$*" >&2
  exit 1
}

while [ $# -gt 0 ]; do
  case "$1" in
    --source) SOURCE="${2:?--source needs a path}"; shift 2 ;;
    --token-file) TOKEN_FILE="${2:?--token-file needs a file}"; shift 2 ;;
    --root) ROOT="${2:?--root needs a directory}"; shift 2 ;;
    --start) START=1; shift ;;
    --no-pip) PIP=0; shift ;;
    --uninstall) UNINSTALL=1; shift ;;
    --purge) PURGE=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
done
if [ "$PURGE" = 1 ] && [ "$UNINSTALL" != 1 ]; then
  die "--purge deletes the config, the token and the buffer (unsent readings included); it only goes with --uninstall: --uninstall --purge"
fi

if [ -n "$ROOT" ]; then
  mkdir -p "$ROOT"
  ROOT="$(cd "$ROOT" && pwd)"
  [ "$ROOT" != / ] || ROOT=""
fi
ETC="$ROOT/etc/edge-agent"
CONFIG="$ETC/config.toml"
TOKEN="$ETC/token"
OPT="$ROOT/opt/edge-agent"
VENV="$OPT/venv"
DATA="$ROOT/var/lib/edge-agent"
UNIT="$ROOT/etc/systemd/system/edge-agent.service"
MODULES="$ROOT/etc/modules-load.d/edge-agent.conf"

# --root installs files only: who owns them and whether systemd knows are the real system's
# business, so those steps say what they would do instead.
real_system() { [ -z "$ROOT" ]; }
systemd_running() { real_system && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; }

if real_system && [ "$(id -u)" != 0 ]; then
  die "run as root (sudo $0 ...), or use --root DIR to install under DIR"
fi

# -- uninstall --------------------------------------------------------------------------------

uninstall() {
  if systemd_running; then
    say "stopping and disabling the service (it commits its last readings first)"
    systemctl disable --now edge-agent.service 2>/dev/null || true
  elif real_system && command -v systemctl >/dev/null; then
    say "disabling the service"
    systemctl disable edge-agent.service 2>/dev/null || true
  fi
  say "removing $UNIT and $MODULES"
  rm -f "$UNIT" "$MODULES"
  if systemd_running; then
    systemctl daemon-reload
    systemctl reset-failed edge-agent.service 2>/dev/null || true
  fi
  say "removing $OPT"
  rm -rf "$VENV"
  rmdir "$OPT" 2>/dev/null || true
  if real_system; then
    if getent passwd "$SERVICE_USER" >/dev/null; then
      say "removing the user $SERVICE_USER"
      userdel "$SERVICE_USER"
    fi
    if getent group "$SERVICE_USER" >/dev/null; then
      groupdel "$SERVICE_USER"
    fi
  else
    note "--root: no user to remove"
  fi
  if [ "$PURGE" = 1 ]; then
    say "purging $ETC and $DATA (config, token and the buffer with any unsent readings)"
    rm -rf "$ETC" "$DATA" "$UNIT.d"
  else
    say "kept $ETC (config, token) and $DATA (buffer); --purge removes them"
  fi
  say "uninstalled"
}

if [ "$UNINSTALL" = 1 ]; then
  uninstall
  exit 0
fi

# -- install ----------------------------------------------------------------------------------

python_ok() { "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }

# Debian and Ubuntu ship venv's pip bootstrap (ensurepip) in python3-venv.
venv_ok() { "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; }

check_python() {
  say "checking Python"
  command -v "$PYTHON" >/dev/null || apt_install python3 python3-venv
  python_ok || die "the agent needs Python 3.11 or newer; $PYTHON is $("$PYTHON" --version 2>&1)." \
    "Use Raspberry Pi OS / Debian 12 (bookworm) or newer, or set PYTHON=/path/to/python3.11"
  venv_ok || apt_install "$(venv_package)"
  note "$("$PYTHON" --version 2>&1) with venv"
}

# python3.11-venv for a Python 3.11: the version-specific package works whatever python3 is.
venv_package() { "$PYTHON" -c 'import sys; print("python3.%d-venv" % sys.version_info[1])'; }

apt_install() {
  if ! real_system || ! command -v apt-get >/dev/null; then
    die "$PYTHON lacks $* and this script cannot install it here; install it, then run again"
  fi
  say "installing $* with apt-get"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

create_user() {
  if ! real_system; then
    say "--root: skipping the system user $SERVICE_USER (no login, home /var/lib/edge-agent," \
      "groups dialout) and file ownership"
    return
  fi
  getent group dialout >/dev/null || groupadd --system dialout
  if getent passwd "$SERVICE_USER" >/dev/null; then
    say "user $SERVICE_USER exists; making sure it is in dialout"
    usermod -a -G dialout "$SERVICE_USER"
    return
  fi
  say "creating the system user $SERVICE_USER (no login, in group dialout for serial ports)"
  local shell=/usr/sbin/nologin
  [ -x "$shell" ] || shell=/sbin/nologin
  [ -x "$shell" ] || shell=/bin/false
  useradd --system --user-group --groups dialout --home-dir /var/lib/edge-agent \
    --no-create-home --shell "$shell" --comment "Madevo Edge Agent" "$SERVICE_USER"
}

# chown only on the real system: under --root the user does not exist.
own() {
  if real_system; then chown "$@"; fi
}

install_venv() {
  if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
    say "virtualenv $VENV exists"
  else
    say "creating the virtualenv $VENV"
    rm -rf "$VENV"
    mkdir -p "$OPT"
    if ! "$PYTHON" -m venv "$VENV"; then
      # ensurepip can be importable and still lack its wheels (Debian splits them out).
      rm -rf "$VENV"
      apt_install "$(venv_package)"
      "$PYTHON" -m venv "$VENV"
    fi
  fi
  if [ "$PIP" = 0 ]; then
    note "--no-pip: not installing the agent into it"
    return
  fi
  local target="$SOURCE"
  if [ -d "$SOURCE" ]; then
    [ -f "$SOURCE/pyproject.toml" ] || die "--source $SOURCE: no pyproject.toml there"
    # Build from a copy: building in the checkout would leave root-owned build/ and
    # *.egg-info directories in someone's working tree.
    BUILD_DIR="$(mktemp -d)"
    tar -C "$SOURCE" --exclude=./.git --exclude=./.venv --exclude=./build \
      --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -C "$BUILD_DIR" -xf -
    target="$BUILD_DIR"
  elif [ ! -f "$SOURCE" ]; then
    die "--source $SOURCE: no such checkout or wheel"
  fi
  say "installing the agent from $SOURCE into $VENV (pip)"
  # --force-reinstall --no-deps: the same version number from a newer checkout still replaces
  # the installed code; the second call adds missing dependencies and keeps satisfied ones.
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    --force-reinstall --no-deps "$target"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$target"
  note "$("$VENV/bin/edge-agent" --version)"
}

install_config() {
  say "configuration in $ETC"
  install -d -m 0755 "$ETC"
  if [ -e "$CONFIG" ]; then
    note "kept the existing $CONFIG"
  else
    local example="$SOURCE/configs/serial-sensor.toml"
    [ -f "$example" ] || example="$CHECKOUT/configs/serial-sensor.toml"
    install -m 0640 "$example" "$CONFIG"
    own root:"$SERVICE_USER" "$CONFIG"
    note "created $CONFIG from $example: edit it (port, url, datasource_id)"
  fi
}

install_token() {
  local value=""
  if [ -n "$TOKEN_FILE" ]; then
    [ -r "$TOKEN_FILE" ] || die "--token-file $TOKEN_FILE: cannot read it"
    value="$(tr -d '[:space:]' <"$TOKEN_FILE")"
    [ -n "$value" ] || die "--token-file $TOKEN_FILE is empty"
  elif [ -n "${EDGE_AGENT_TOKEN:-}" ]; then
    value="$(printf '%s' "$EDGE_AGENT_TOKEN" | tr -d '[:space:]')"
  fi
  if [ -n "$value" ]; then
    say "installing the upload token in $TOKEN"
    local tmp
    tmp="$(mktemp "$ETC/.token.XXXXXX")"
    printf '%s\n' "$value" >"$tmp" # mktemp made it 0600
    own "$SERVICE_USER:$SERVICE_USER" "$tmp"
    mv -f "$tmp" "$TOKEN"
  elif [ -e "$TOKEN" ]; then
    say "kept the existing token $TOKEN"
  else
    say "creating an empty token file $TOKEN: put the upload token in it"
    install -m 0600 /dev/null "$TOKEN"
  fi
  chmod 0600 "$TOKEN"
  own "$SERVICE_USER:$SERVICE_USER" "$TOKEN"
}

install_data_dir() {
  say "data directory $DATA"
  install -d -m 0750 "$DATA"
  own -R "$SERVICE_USER:$SERVICE_USER" "$DATA"
}

install_unit() {
  say "installing the unit $UNIT"
  install -d -m 0755 "$(dirname "$UNIT")"
  install -m 0644 "$HERE/edge-agent.service" "$UNIT"
}

# The unit admits serial devices by driver (DeviceAllow=char-ttyUSB ...), which systemd looks
# up in /proc/devices when the service starts: a driver loaded later, when an adapter is first
# plugged in, would stay locked out until a restart. So load the USB serial drivers at boot.
install_modules() {
  say "loading the USB serial drivers at boot ($MODULES)"
  install -d -m 0755 "$(dirname "$MODULES")"
  printf '# USB serial drivers for edge-agent.service (DeviceAllow=char-ttyUSB, char-ttyACM)\n%s\n%s\n' \
    usbserial cdc_acm >"$MODULES"
  chmod 0644 "$MODULES"
  if real_system && command -v modprobe >/dev/null; then
    modprobe -a usbserial cdc_acm 2>/dev/null || note "could not load usbserial/cdc_acm now"
  fi
}

# Run `edge-agent check` as the service user: this also proves it can read config and token.
config_ok() {
  [ -x "$VENV/bin/edge-agent" ] && command -v runuser >/dev/null || return 0
  say "checking the configuration as $SERVICE_USER"
  if runuser -u "$SERVICE_USER" -- "$VENV/bin/edge-agent" check --config "$CONFIG"; then
    return 0
  fi
  warn "edge-agent check failed (above): fix $CONFIG or $TOKEN, then: systemctl restart edge-agent"
  return 1
}

activate() {
  if ! real_system; then
    note "--root: not running systemctl (on the gateway: systemctl enable --now edge-agent)"
    return
  fi
  if ! systemd_running; then
    if command -v systemctl >/dev/null; then
      say "systemd is not running here; enabling the service for the next boot"
      systemctl enable edge-agent.service
    else
      warn "no systemctl: start $VENV/bin/edge-agent run --config $CONFIG another way"
    fi
    return
  fi
  say "enabling the service (systemctl daemon-reload; enable)"
  systemctl daemon-reload
  systemctl enable --quiet edge-agent.service
  local running=0
  systemctl is-active --quiet edge-agent.service && running=1
  if [ "$START" = 0 ] && [ "$running" = 0 ]; then
    note "not started; start it with: systemctl start edge-agent"
  elif [ "$CONFIG_OK" = 0 ]; then
    warn "left the service as it was: it would not start with this configuration"
  elif [ "$running" = 1 ]; then
    say "restarting the service on what was just installed"
    systemctl restart edge-agent.service
  else
    say "starting the service"
    systemctl start edge-agent.service
  fi
}

check_python
create_user
install_venv
install_config
install_token
install_data_dir
install_unit
install_modules
if real_system; then config_ok || CONFIG_OK=0; fi
activate
say "done. Status: systemctl status edge-agent; logs: journalctl -u edge-agent -f"
