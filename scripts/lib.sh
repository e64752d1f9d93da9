#!/usr/bin/env bash
# Shared by scripts/run, scripts/test and scripts/infra: make local RabbitMQ and a
# MongoDB-compatible server available on a fresh Debian machine, reusing what is there.
# Safe to source and to re-run.

HERALD_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HERALD_VAR="$HERALD_ROOT/var"
SECANTUS_VERSION="0.5.3-beta.196"
SECANTUS_PORT="${HERALD_SECANTUS_PORT:-47017}"
export PATH="$HOME/.cargo/bin:$PATH"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # port seconds what
  local i
  for ((i = 0; i < $2 * 5; i++)); do
    port_open "$1" && return 0
    sleep 0.2
  done
  echo "error: $3 did not open port $1 within $2s" >&2
  return 1
}

APT_UPDATED=""
apt_install() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if [ -z "$APT_UPDATED" ]; then
    say "apt-get update"
    $sudo apt-get update -qq
    APT_UPDATED=1
  fi
  say "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

# RabbitMQ: the broker on 127.0.0.1:5672 if one answers; otherwise Debian's package.
ensure_rabbitmq() {
  if [ -n "${AMQP_URL:-}" ]; then
    say "RabbitMQ: using AMQP_URL"
    return 0
  fi
  if port_open 5672; then
    say "RabbitMQ: already running on 127.0.0.1:5672"
    return 0
  fi
  command -v rabbitmq-server >/dev/null 2>&1 || apt_install rabbitmq-server
  say "RabbitMQ: starting rabbitmq-server -detached"
  rabbitmq-server -detached >/dev/null 2>&1 || true
  wait_port 5672 90 "rabbitmq-server"
}

# The console's browser tests: Node.js, Debian's Chromium and playwright-core from npm
# (installed into tests/ui/node_modules once, again only when the lock file changes).
ensure_browser_tools() {
  { command -v node && command -v npm; } >/dev/null 2>&1 || apt_install nodejs npm
  [ -x /usr/bin/chromium ] || apt_install chromium chromium-driver
  local ui="$HERALD_ROOT/tests/ui"
  if [ ! -d "$ui/node_modules/playwright-core" ] ||
    [ "$ui/package-lock.json" -nt "$ui/node_modules/.package-lock.json" ]; then
    say "npm ci in tests/ui (playwright-core; it drives Debian's Chromium)"
    npm ci --prefix "$ui" --no-audit --no-fund --loglevel=error >/dev/null
  fi
}

# The Python tools the tests check herald against (PyPI): schemathesis (the OpenAPI
# document against the running API), dkimpy (DKIM signatures) and twilio (its request
# signatures) and standardwebhooks (the Standard Webhooks reference verifier), in a virtual
# environment under ~/.cache/herald, installed again only when the pins change.
PYTHON_TOOLS="schemathesis==4.32.5 dkimpy==1.1.8 twilio==9.13.0 sendgrid==6.12.5 aws-sns-message-validator==0.0.5 standardwebhooks==1.3.0"
ensure_python_tools() {
  local venv="${XDG_CACHE_HOME:-$HOME/.cache}/herald/venv"
  export HERALD_SCHEMATHESIS="$venv/bin/schemathesis" HERALD_PYTHON="$venv/bin/python"
  if [ "$(cat "$venv/.herald-tools" 2>/dev/null)" = "$PYTHON_TOOLS" ]; then
    return 0
  fi
  command -v python3 >/dev/null 2>&1 || apt_install python3
  if [ ! -x "$venv/bin/pip" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv && python3 -m venv "$venv"; }
  fi
  say "installing $PYTHON_TOOLS (PyPI) into $venv"
  # shellcheck disable=SC2086
  "$venv/bin/pip" install --quiet --disable-pip-version-check $PYTHON_TOOLS
  echo "$PYTHON_TOOLS" >"$venv/.herald-tools"
}

secantus_installed() {
  command -v secantusd-rs >/dev/null 2>&1 &&
    cargo install --list 2>/dev/null | grep -q "^secantus-mdb v$SECANTUS_VERSION:"
}

# The SecantusDB server binary, built once and cached in ~/.cargo/bin.
ensure_secantus_installed() {
  secantus_installed && return 0
  apt_install cmake build-essential pkg-config
  say "installing SecantusDB $SECANTUS_VERSION (once; about 9 minutes on 2 cores)"
  local started=$SECONDS
  cargo install secantus-mdb --version "$SECANTUS_VERSION" --ignore-rust-version --quiet
  say "SecantusDB installed in $((SECONDS - started))s"
}

# MongoDB: MONGODB_URI if set; otherwise SecantusDB (built once, cached in ~/.cargo/bin),
# run as a separate process (it is GPL; herald never links it) with data under var/.
SECANTUS_STARTED=""
ensure_mongodb() {
  if [ -n "${MONGODB_URI:-}" ]; then
    say "MongoDB: using MONGODB_URI"
    return 0
  fi
  export MONGODB_URI="mongodb://127.0.0.1:$SECANTUS_PORT/?directConnection=true"
  if port_open "$SECANTUS_PORT"; then
    say "MongoDB: SecantusDB already running on port $SECANTUS_PORT"
    return 0
  fi
  ensure_secantus_installed
  mkdir -p "$HERALD_VAR/secantus"
  say "MongoDB: starting SecantusDB on port $SECANTUS_PORT (data in var/secantus)"
  # --sync-on-commit: a commit is on disk before it is acknowledged (without it a killed
  # server loses journaled writes); HERALD_SECANTUS_SYNC=0 measures the difference.
  local sync=(--sync-on-commit)
  [ "${HERALD_SECANTUS_SYNC:-1}" = 1 ] || sync=()
  nohup secantusd-rs --port "$SECANTUS_PORT" --storage-path "$HERALD_VAR/secantus" \
    "${sync[@]}" --log-level WARNING >"$HERALD_VAR/secantus.log" 2>&1 &
  echo $! >"$HERALD_VAR/secantus.pid"
  SECANTUS_STARTED=1
  wait_port "$SECANTUS_PORT" 60 "secantusd-rs" || { tail -20 "$HERALD_VAR/secantus.log" >&2; return 1; }
}

# Stops the SecantusDB this checkout started (SIGTERM lets WiredTiger close cleanly).
stop_mongodb() {
  local pidfile="$HERALD_VAR/secantus.pid"
  [ -f "$pidfile" ] || return 0
  local pid
  pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    say "stopping SecantusDB (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  fi
  rm -f "$pidfile"
}

# Stops SecantusDB at exit only if this script started it.
stop_mongodb_if_started() {
  [ -n "$SECANTUS_STARTED" ] && stop_mongodb
  return 0
}
