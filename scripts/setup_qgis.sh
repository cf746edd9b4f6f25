#!/usr/bin/env bash
# Debian/Ubuntu: QGIS's Python bindings for /usr/bin/python3 (plugin tests, headless), and the QGIS
# desktop with xvfb for the real-desktop test (tests/plugin/test_desktop.py), once.
set -euo pipefail
if /usr/bin/python3 -c "import qgis.core, venv, ensurepip" 2>/dev/null && command -v Xvfb >/dev/null \
        && command -v xvfb-run >/dev/null && command -v qgis >/dev/null; then
    exit 0
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends python3-qgis qgis-providers qgis xvfb xauth python3-venv python3-pip >/dev/null
