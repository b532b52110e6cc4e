#!/usr/bin/env bash
# Install everything the test suite needs on a Debian machine, then run it.
#   sudo scripts/test.sh            # whole suite
#   sudo scripts/test.sh -k accept  # extra arguments go to pytest
# Debian packages: the build toolchain for the spawn extension, and the real
# tools that share our protocol (systemd-socket-activate, systemd-notify,
# libsystemd, python3-systemd) and real inetd programs the tests drive.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(python3 python3-venv python3-dev gcc libc6-dev libsystemd-dev python3-systemd systemd
              netcat-openbsd curl procps iproute2 rsync git fingerd finger tftpd-hpa tftp-hpa strace prometheus
              redis-server socat)
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        # Keep packages from starting their own daemons (fingerd, tftpd) here.
        made_policy=0
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; made_policy=1
        fi
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" || \
            echo "scripts/test.sh: some packages failed to install; tests that need them will skip" >&2
        [ $made_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
    fi
else
    echo "scripts/test.sh: not root or no apt-get: not installing Debian packages (some tests will skip)" >&2
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
exec .venv/bin/python -m pytest "$@"
