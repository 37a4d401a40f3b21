# Start a throw-away PostgreSQL server on 127.0.0.1 (Debian packages) and export its URL as
# PRECSEARCH_TEST_POSTGRES. Sourced by .ci/run; stops the server when the shell exits.
start_postgres() {
  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
  local bin port=54329
  bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  PGDATA_CI=$(mktemp -d /tmp/precsearch-pg.XXXXXX)
  chown postgres "$PGDATA_CI"
  su postgres -s /bin/sh -c "$bin/initdb -D $PGDATA_CI -A trust -U postgres" >/dev/null
  su postgres -s /bin/sh -c "$bin/pg_ctl -D $PGDATA_CI -w -l $PGDATA_CI/server.log \
      -o '-c listen_addresses=127.0.0.1 -p $port -k $PGDATA_CI' start" >/dev/null
  trap "su postgres -s /bin/sh -c '$bin/pg_ctl -D $PGDATA_CI -m fast stop' >/dev/null 2>&1 || true" EXIT
  psql -q -h 127.0.0.1 -p $port -U postgres -c "CREATE USER precsearch PASSWORD 'ci-only-secret'" \
       -c "CREATE DATABASE precsearch OWNER precsearch"
  export PRECSEARCH_TEST_POSTGRES="postgresql://precsearch:ci-only-secret@127.0.0.1:$port/precsearch"
  echo "PostgreSQL for the multi-worker tests: 127.0.0.1:$port"
}
start_postgres || echo "WARNING: PostgreSQL could not be started; its multi-worker test will be skipped" >&2
