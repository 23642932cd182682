#!/usr/bin/env bash
# Make sure PostgreSQL (127.0.0.1:5432, database `test`) and Redis (127.0.0.1:6379) are up.
# Starts them if they are installed and down; says exactly what is missing otherwise.
# With COORDINATOR_NATS_URL set, also a JetStream-enabled nats-server with the coordinator's
# generated authorization (islandlink/nats_auth.py) in COORDINATOR_NATS_DIR (default
# ${COORDINATOR_DATA_DIR:-./data}/nats): nats.conf, auth.conf, nats.pid, js/, nats.log.
# Exit status: 0 when all answer, 1 when one does not.
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
if [ -n "${COORDINATOR_NATS_URL:-}" ]; then
  NATS_DIR=${COORDINATOR_NATS_DIR:-${COORDINATOR_DATA_DIR:-./data}/nats}
  hostport=${COORDINATOR_NATS_URL#*://}; hostport=${hostport##*@}; hostport=${hostport%%/*}
  NATS_HOST=${hostport%%:*}; NATS_PORT=${hostport##*:}; [ "$NATS_PORT" = "$hostport" ] && NATS_PORT=4222
  nats_up() { (exec 3<>"/dev/tcp/$NATS_HOST/$NATS_PORT") 2>/dev/null; }
  if nats_up; then
    echo "services: NATS is up on $NATS_HOST:$NATS_PORT"
  else
    if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then
      if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "services: installing nats-server (apt-get install -y nats-server)"
        apt-get install -y nats-server >/dev/null 2>&1 || { apt-get update >/dev/null 2>&1 && apt-get install -y nats-server >/dev/null 2>&1; }
      fi
    fi
    NATS_BIN=$(command -v nats-server || echo /usr/sbin/nats-server)
    PY=$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )
    if [ ! -x "$NATS_BIN" ]; then
      echo "services: COORDINATOR_NATS_URL is set but nats-server is not installed and could not be installed" \
           "(Debian: apt-get install nats-server, as root)" >&2
      status=1
    elif ! "$PY" -c "import bcrypt, islandlink.nats_auth" 2>/dev/null; then
      echo "services: cannot write the NATS config: $PY lacks the project (run: . scripts/env.sh)" >&2
      status=1
    else
      mkdir -p "$NATS_DIR/js"
      NATS_DIR="$NATS_DIR" NATS_PORT="$NATS_PORT" NATS_HOST="$NATS_HOST" "$PY" - <<'PYEOF'
import os
from pathlib import Path
from islandlink import nats_auth
from protocol.nats import split_url
d = Path(os.environ["NATS_DIR"]).resolve()
_, user, password = split_url(os.environ["COORDINATOR_NATS_URL"])
(d / "nats.conf").write_text(nats_auth.main_config(
    port=int(os.environ["NATS_PORT"]), host=os.environ["NATS_HOST"], store_dir=str(d / "js"),
    auth_file="auth.conf", pid_file=str(d / "nats.pid")))
auth = d / "auth.conf"
if not auth.exists():  # the coordinator rewrites it with the approved Islands when it starts
    auth.write_text(nats_auth.render(
        nats_auth.NatsUser(user or "coordinator", nats_auth.stable_hash(password or "")),
        nats_auth.NatsUser(os.environ.get("COORDINATOR_NATS_PAIRING_USER") or "pairing",
                           nats_auth.stable_hash(os.environ.get("COORDINATOR_NATS_PAIRING_PASSWORD") or "pairing")),
        []))
PYEOF
      "$NATS_BIN" -c "$NATS_DIR/nats.conf" -l "$NATS_DIR/nats.log" >/dev/null 2>&1 &
      for _ in $(seq 1 20); do nats_up && break; sleep 0.5; done
      if nats_up; then
        echo "services: started nats-server (JetStream) on $NATS_HOST:$NATS_PORT; config $NATS_DIR/nats.conf," \
             "authorization $NATS_DIR/auth.conf (the coordinator keeps it: COORDINATOR_NATS_DIR=$NATS_DIR)"
      else
        echo "services: nats-server did not start; see $NATS_DIR/nats.log" >&2
        status=1
      fi
    fi
  fi
fi
exit $status
