#!/usr/bin/env bash
# Makes sure the engines the service-backed tests talk to are running on loopback:
# PostgreSQL 5432, Redis 6379, RabbitMQ 5672, NATS 4222. Starts whichever is down with the
# machine's own packages, and waits until it answers. Prints one line per engine.
set -uo pipefail

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() {
  local name=$1 port=$2
  for _ in $(seq 1 60); do
    if up "$port"; then echo "$name: up on 127.0.0.1:$port"; return 0; fi
    sleep 1
  done
  echo "$name: still down on 127.0.0.1:$port" >&2
  return 1
}

start_postgres() {
  if command -v pg_ctlcluster >/dev/null 2>&1; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
  fi
}
start_redis() {
  command -v redis-server >/dev/null 2>&1 && mkdir -p /var/lib/redis /var/log/redis &&
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log
}
start_rabbitmq() { command -v rabbitmq-server >/dev/null 2>&1 && rabbitmq-server -detached; }
start_nats() {
  [ -x /usr/sbin/nats-server ] && start-stop-daemon --start --oknodo --background \
    --exec /usr/sbin/nats-server -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server \
    -l /var/log/nats-server.log
}

status=0
for entry in postgres:5432 redis:6379 rabbitmq:5672 nats:4222; do
  name=${entry%%:*} port=${entry##*:}
  if ! up "$port"; then
    echo "$name: down, starting it"
    "start_$name" >/dev/null 2>&1 || echo "$name: could not be started here" >&2
  fi
  wait_for "$name" "$port" || status=1
done
exit $status
