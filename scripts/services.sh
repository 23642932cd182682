#!/usr/bin/env bash
# Make sure PostgreSQL (127.0.0.1:5432, database `test`) and Redis (127.0.0.1:6379) are up.
# Starts them if they are installed and down; says exactly what is missing otherwise.
# Exit status: 0 when both answer, 1 when one does not.
set -u
PGHOST_ADDR=${PGHOST_ADDR:-127.0.0.1}
PGPORT_NUM=${PGPORT_NUM:-5432}
REDIS_PORT=${REDIS_PORT:-6379}
status=0

pg_up() { pg_isready -q -h "$PGHOST_ADDR" -p "$PGPORT_NUM" 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; }

if ! command -v pg_isready >/dev/null 2>&1; then
  echo "services: PostgreSQL client tools are not installed (Debian: apt-get install postgresql)" >&2
  status=1
elif pg_up; then
  echo "services: PostgreSQL is up on $PGHOST_ADDR:$PGPORT_NUM"
else
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    for v in $(ls /etc/postgresql); do
      pg_ctlcluster --skip-systemctl-redirect "$v" main start 2>/dev/null || true
    done
    for _ in $(seq 1 30); do pg_up && break; sleep 1; done
  fi
  if pg_up; then
    echo "services: started PostgreSQL on $PGHOST_ADDR:$PGPORT_NUM"
  else
    echo "services: PostgreSQL is not reachable on $PGHOST_ADDR:$PGPORT_NUM and could not be started" \
         "(install: apt-get install postgresql; then: pg_ctlcluster <version> main start)" >&2
    status=1
  fi
fi
if pg_up && command -v psql >/dev/null 2>&1; then
  if ! psql -h "$PGHOST_ADDR" -p "$PGPORT_NUM" -U postgres -d test -c 'select 1' >/dev/null 2>&1; then
    psql -h "$PGHOST_ADDR" -p "$PGPORT_NUM" -U postgres -d postgres -c 'CREATE DATABASE test' >/dev/null 2>&1 \
      && echo "services: created database test" \
      || { echo "services: cannot open database 'test' as user postgres on $PGHOST_ADDR (trust auth expected)" >&2; status=1; }
  fi
fi

if ! command -v redis-server >/dev/null 2>&1 && ! redis_up; then
  echo "services: Redis is not installed (Debian: apt-get install redis-server)" >&2
  status=1
elif redis_up; then
  echo "services: Redis is up on 127.0.0.1:$REDIS_PORT"
else
  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log >/dev/null 2>&1 \
    || redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no >/dev/null 2>&1
  for _ in $(seq 1 20); do redis_up && break; sleep 0.5; done
  if redis_up; then
    echo "services: started Redis on 127.0.0.1:$REDIS_PORT"
  else
    echo "services: Redis is installed but did not start on 127.0.0.1:$REDIS_PORT" >&2
    status=1
  fi
fi
exit $status
