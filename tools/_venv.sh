# Sourced by tools/test.sh and tools/demo.sh: creates .venv with Python 3.11 when missing and installs tweetjax.
# The install is redone only when setup.cfg changes (its hash is kept in .venv/.tweetjax-setup).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TWEETJAX_VENV:-$REPO/.venv}"  # tools/gpu_check.sh keeps its own (.venv-gpu)
EXTRAS="${TWEETJAX_EXTRAS:-test}"
PYTHON_BIN="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[tweetjax] creating $VENV with $PYTHON_BIN"
  "$PYTHON_BIN" -m venv "$VENV"
fi
stamp="$(sha256sum "$REPO/setup.cfg" | cut -c1-16)-$EXTRAS"
if [ "$(cat "$VENV/.tweetjax-setup" 2>/dev/null)" != "$stamp" ]; then
  echo "[tweetjax] installing tweetjax[$EXTRAS] into $VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e "$REPO[$EXTRAS]"
  echo "$stamp" > "$VENV/.tweetjax-setup"
fi
export PATH="$VENV/bin:$PATH"
cd "$REPO"
