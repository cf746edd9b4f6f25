#!/usr/bin/env bash
# Debian/Ubuntu: QGIS's Python bindings for /usr/bin/python3 (plugin tests, headless), once.
set -euo pipefail
if /usr/bin/python3 -c "import qgis.core, venv, ensurepip" 2>/dev/null && command -v Xvfb >/dev/null; then
    exit 0
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends python3-qgis qgis-providers xvfb python3-venv python3-pip >/dev/null
