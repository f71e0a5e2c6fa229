#!/usr/bin/env bash
# Create (or reuse) the project's one environment in .venv and install the pinned stack
# from requirements/env.txt. Re-running is fast: a stamp holding the hash of the pin file
# and of this script is written only after a complete install.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${M3VIT_VENV:-.venv}
PY=${PYTHON:-python3.11}
REQ=requirements/env.txt
STAMP="$VENV/.m3vit-env-stamp"
want=$(cat "$REQ" "$0" | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
command -v "$PY" >/dev/null || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 is required, found {sys.version}"'
echo "[setup_env] creating environment in $VENV (one-time, a few minutes)"
rm -f "$STAMP"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# 1. torch first, from the local CPU wheel: the '+cpu' pin fails loudly instead of
#    silently resolving a multi-GB CUDA build.
"${PIP[@]}" install "$(grep -E '^torch==' "$REQ")" "$(grep -E '^setuptools==' "$REQ")"
# 2. the rest of the pinned stack (finn-plus is commented out there on purpose).
"${PIP[@]}" install -r "$REQ"
# 3. finn-plus and hls4ml without their dependencies: finn-plus's own brevitas/setuptools
#    pins would replace the CPU torch (its real requirements are listed in env.txt);
#    hls4ml is only used for the ap_int/hls_stream headers it ships (MoE kernel C-sim).
nodeps=$(sed -n 's/^# \(\(finn-plus\|hls4ml\)==[0-9.]*\)$/\1/p' "$REQ")
# shellcheck disable=SC2086
"${PIP[@]}" install --no-deps $nodeps
# 4. this project, editable, so tools/ and tests see the working tree.
"${PIP[@]}" install --no-deps --no-build-isolation -e .
echo "$want" > "$STAMP"
echo "[setup_env] environment ready: $VENV"
