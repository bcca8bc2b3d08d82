#!/usr/bin/env bash
# Install the Debian packages the integration tests use as real peers, if missing.
set -euo pipefail
need=()
# dcmtk's own binary: pynetdicom puts a storescu of its own in the virtual environment
[ -x /usr/bin/storescu ] || need+=(dcmtk)
command -v Orthanc >/dev/null || need+=(orthanc)
command -v chromium >/dev/null || need+=(chromium)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "system-deps: missing ${need[*]}; install them (Debian: apt-get install ${need[*]})" >&2
  echo "system-deps: the tests that need them will be skipped" >&2
  exit 0
fi
echo "system-deps: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
