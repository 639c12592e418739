#!/usr/bin/env bash
# Builds the browser terminal page into clients/web/dist (what clawtermd serves on its
# WebSocket port): installs the npm packages pinned by the lock files (from the npm registry;
# nothing third-party is committed) and bundles the page with esbuild. Needs Node.js >= 18 and
# npm (Debian: apt-get install nodejs npm). Run from anywhere; a second run reinstalls only
# when a lock file changed.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
need() { command -v "$1" >/dev/null 2>&1 || { echo "build-web: $1 is missing (apt-get install nodejs npm)" >&2; exit 1; }; }
need node
need npm
install() {
  local dir="$1"
  if [ ! -d "$dir/node_modules" ] || [ "$dir/package-lock.json" -nt "$dir/node_modules" ]; then
    echo "build-web: installing npm packages in ${dir#$root/} (npm ci)"
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
    touch "$dir/node_modules"
  fi
}
install "$root/clients/js"
install "$root/clients/web"
(cd "$root/clients/web" && npm run --silent typecheck && npm run --silent build)
