#!/usr/bin/env bash
# Install Debian's PostgreSQL server for the shared-queue tests, if missing.
# The tests start their own throwaway cluster (tests/pg_support.py); this only provides initdb and
# pg_ctl (under /usr/lib/postgresql/<version>/bin). Nothing is started or enabled here.
set -euo pipefail
if compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null && compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo -n"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# A policy-rc.d that exits 101 keeps the package from starting its own cluster during the install;
# one that is already there (containers have one) is left alone.
if [ ! -e /usr/sbin/policy-rc.d ]; then
  $SUDO sh -c 'printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d'
  trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
fi
$SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null
ls /usr/lib/postgresql/*/bin/initdb
