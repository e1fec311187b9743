#!/bin/sh
# The entry point of the local node's database image (operator/shadowgate_dev/localenv/images.py):
# what the timescale/timescaledb image's does for manifests/overlays/timescaledb. On the first start
# (an empty PGDATA): initdb with POSTGRES_USER and POSTGRES_PASSWORD, then the POSTGRES_DB database with
# the timescaledb extension in it. Then postgres, with the arguments the StatefulSet gives
# (-c shared_preload_libraries=timescaledb ...). Writes only PGDATA, /var/run/postgresql and /tmp
# (the root file system is read-only).
set -eu
: "${PGDATA:=/var/lib/postgresql/data}"
: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
socket=/var/run/postgresql

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    mkdir -p "$PGDATA"
    chmod 700 "$PGDATA"
    password="$(mktemp)"
    printf '%s\n' "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is required}" >"$password"
    initdb -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$password" --auth-local=trust \
        --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 --no-instructions
    rm -f "$password"
    printf "listen_addresses = '*'\n" >>"$PGDATA/postgresql.conf"
    printf 'host all all all scram-sha-256\n' >>"$PGDATA/pg_hba.conf"
    pg_ctl -D "$PGDATA" -w -o "-c listen_addresses='' -k $socket" start
    if [ "$POSTGRES_DB" != postgres ]; then
        psql -v ON_ERROR_STOP=1 -h "$socket" -U "$POSTGRES_USER" -d postgres -c "CREATE DATABASE \"$POSTGRES_DB\""
    fi
    psql -v ON_ERROR_STOP=1 -h "$socket" -U "$POSTGRES_USER" -d "$POSTGRES_DB" -c "CREATE EXTENSION IF NOT EXISTS timescaledb"
    pg_ctl -D "$PGDATA" -m fast -w stop
fi

exec postgres -D "$PGDATA" -k "$socket" -c "timescaledb.telemetry_level=${TIMESCALEDB_TELEMETRY:-off}" "$@"
