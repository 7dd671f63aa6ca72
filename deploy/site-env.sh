# Sourced by the deploy/*.sh scripts (not run): where the project and this host's state live, and
# the site's settings from ~/.bilevel/env (ports, venv, Redis URL, ...) loaded into the environment
# so every script sees the same ones.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
state_dir="${BILEVEL_STATE_DIR:-$HOME/.bilevel}"
if [ -f "$state_dir/env" ]; then
  set -a
  # shellcheck disable=SC1091
  . "$state_dir/env"
  set +a
fi
venv="${BILEVEL_VENV:-$HOME/bilevel-venv}"
