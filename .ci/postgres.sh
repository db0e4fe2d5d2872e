#!/usr/bin/env bash
# A throwaway local PostgreSQL server for the registry tests.
#
#   eval "$(.ci/postgres.sh start)"   # prints: export DSV41_TEST_POSTGRES_URL=postgresql://...
#   .ci/postgres.sh stop
#
# Installs Debian's postgresql package when no server binaries are found (needs root), runs the
# server as the 'postgres' user when started as root, listens on 127.0.0.1 only (trust auth),
# and keeps everything under $DSV41_PG_DIR (default /tmp/dsv41-pg). Only the export line goes to
# stdout; progress goes to stderr.
set -euo pipefail

PGDIR=${DSV41_PG_DIR:-/tmp/dsv41-pg}
PGPORT=${DSV41_PG_PORT:-54329}
DB=dsv41_test

log() { echo "postgres.sh: $*" >&2; }

find_bin() {
  local d
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/pg_ctl" ] && { echo "$d"; return 0; }
  done
  command -v pg_ctl >/dev/null 2>&1 && { dirname "$(readlink -f "$(command -v pg_ctl)")"; return 0; }
  return 1
}

as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start() {
  local bin
  if ! bin=$(find_bin); then
    [ "$(id -u)" = 0 ] || { log "PostgreSQL is not installed and this is not root"; exit 1; }
    log "installing postgresql (apt-get)"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
    bin=$(find_bin)
  fi
  stop_quiet
  mkdir -p "$PGDIR"
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$PGDIR"
  as_pg "$bin/initdb" -D "$PGDIR/data" -U postgres --auth=trust -E UTF8 >"$PGDIR/initdb.log" 2>&1 \
    || { cat "$PGDIR/initdb.log" >&2; exit 1; }
  as_pg "$bin/pg_ctl" -D "$PGDIR/data" -l "$PGDIR/server.log" -w -t 60 \
    -o "-p $PGPORT -k $PGDIR -c listen_addresses=127.0.0.1 -c max_connections=300" start >&2 \
    || { cat "$PGDIR/server.log" >&2; exit 1; }
  as_pg "$bin/createdb" -h 127.0.0.1 -p "$PGPORT" -U postgres "$DB"
  log "PostgreSQL $("$bin/postgres" --version | awk '{print $3}') running on 127.0.0.1:$PGPORT (data in $PGDIR)"
  echo "export DSV41_TEST_POSTGRES_URL=postgresql://postgres@127.0.0.1:$PGPORT/$DB"
}

stop_quiet() {
  local bin
  bin=$(find_bin) || return 0
  if [ -f "$PGDIR/data/postmaster.pid" ]; then
    as_pg "$bin/pg_ctl" -D "$PGDIR/data" -m fast -w stop >&2 || true
  fi
  rm -rf "$PGDIR"
}

case "${1:-}" in
  start) start ;;
  stop) stop_quiet; log "stopped" ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
