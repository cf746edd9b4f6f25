#!/usr/bin/env bash
# Debian/Ubuntu ship python3 without venv/ensurepip: install python3-venv when the chosen Python lacks it.
set -euo pipefail
PYTHON="${1:-python3}"
if "$PYTHON" -c "import venv, ensurepip" 2>/dev/null; then
    exit 0
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends python3-venv python3-pip >/dev/null
