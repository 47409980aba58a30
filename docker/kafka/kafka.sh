#!/usr/bin/env bash
# Run a throwaway single-node Apache Kafka (KRaft) broker from plain jars
# fetched from Maven Central -- no Docker, no Kafka distribution tarball.
#
# Usage:
#   docker/kafka/kafka.sh fetch
#   docker/kafka/kafka.sh start  [--port N] [--controller-port N] [--data-dir D]
#                                [--sasl-port N]
#   docker/kafka/kafka.sh stop   [--port N] [--data-dir D] [--wipe]   (--wipe: delete its data dir)
#   docker/kafka/kafka.sh status [--port N] [--data-dir D]
#   docker/kafka/kafka.sh topics [--port N] -- <kafka-topics arguments>
#
# Environment:
#   AUTOGLM_KAFKA_HOME     cache root (default: $HOME/.cache/autoglm/kafka)
#   AUTOGLM_KAFKA_VERSION  override <kafka.version> from pom.xml
#   AUTOGLM_KAFKA_PORT     default broker port (default: 9092)
#   AUTOGLM_KAFKA_TIMEOUT  seconds to wait for the broker (default: 90)
#   AUTOGLM_KAFKA_HEAP     JVM heap options (default: -Xms256m -Xmx512m)
#   AUTOGLM_KCAT           kcat binary used for the readiness probe
#                          (default: kcat when on PATH; "none" to skip it)
#
# `start` wipes the data dir (a fresh, empty broker every time) and prints
# KAFKA_BOOTSTRAP=127.0.0.1:<port> once the broker answers metadata requests.
# With --sasl-port it also opens a SASL_PLAINTEXT listener (mechanism PLAIN,
# user "autoglm", password from AUTOGLM_KAFKA_SASL_PASSWORD, default
# "autoglm-secret") and prints KAFKA_SASL_BOOTSTRAP=127.0.0.1:<sasl port>.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
POM="$SCRIPT_DIR/pom.xml"
KAFKA_HOME_DIR="${AUTOGLM_KAFKA_HOME:-$HOME/.cache/autoglm/kafka}"
DEFAULT_PORT="${AUTOGLM_KAFKA_PORT:-9092}"
START_TIMEOUT="${AUTOGLM_KAFKA_TIMEOUT:-90}"
HEAP_OPTS="${AUTOGLM_KAFKA_HEAP:--Xms256m -Xmx512m}"
KCAT="${AUTOGLM_KCAT:-kcat}"

log() { echo "kafka.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

kafka_version() {
  if [[ -n "${AUTOGLM_KAFKA_VERSION:-}" ]]; then
    echo "$AUTOGLM_KAFKA_VERSION"
    return
  fi
  local v
  v="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$POM" | head -n1)"
  [[ -n "$v" ]] || die "cannot read <kafka.version> from $POM"
  echo "$v"
}

VERSION="$(kafka_version)"
LIB_DIR="$KAFKA_HOME_DIR/lib-$VERSION"

check_java() {
  command -v java >/dev/null 2>&1 || die "java not found on PATH (Kafka $VERSION needs Java 17+)"
  local spec major
  spec="$(java -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p')"
  major="${spec#1.}"
  major="${major%%.*}"
  if [[ -n "$major" && "$major" -lt 17 ]]; then
    die "Java $spec found; Kafka $VERSION brokers need Java 17+"
  fi
}

jars_present() {
  [[ -f "$LIB_DIR/.complete" && -f "$LIB_DIR/kafka_2.13-$VERSION.jar" ]]
}

cmd_fetch() {
  if jars_present; then
    log "Kafka $VERSION jars already in $LIB_DIR"
    return 0
  fi
  command -v mvn >/dev/null 2>&1 || die "mvn not found on PATH (needed once to fetch the Kafka jars)"
  mkdir -p "$KAFKA_HOME_DIR"
  local tmp
  tmp="$(mktemp -d "$KAFKA_HOME_DIR/.lib-$VERSION.XXXXXX")"
  log "fetching Kafka $VERSION jars into $LIB_DIR"
  # mvn -q still prints errors (and stray ANSI resets) on stdout: keep its
  # output aside and show it only when the fetch fails.
  if ! mvn -q -B -Dstyle.color=never -f "$POM" -Dkafka.version="$VERSION" \
      dependency:copy-dependencies -DoutputDirectory="$tmp" >"$tmp.mvn.log" 2>&1; then
    cat "$tmp.mvn.log" >&2 || true
    rm -rf "$tmp" "$tmp.mvn.log"
    die "mvn dependency:copy-dependencies failed"
  fi
  rm -f "$tmp.mvn.log"
  [[ -f "$tmp/kafka_2.13-$VERSION.jar" ]] || { rm -rf "$tmp"; die "kafka_2.13-$VERSION.jar missing after fetch"; }
  touch "$tmp/.complete"
  rm -rf "$LIB_DIR"
  mv "$tmp" "$LIB_DIR"
  log "fetched $(find "$LIB_DIR" -name '*.jar' | wc -l) jars"
}

# ---------------------------------------------------------------- options --
PORT=""
CONTROLLER_PORT=""
SASL_PORT=""
SASL_PASSWORD="${AUTOGLM_KAFKA_SASL_PASSWORD:-autoglm-secret}"
DATA_DIR=""
WIPE=""
EXTRA_ARGS=()

parse_opts() {
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --port) PORT="${2:?--port needs a value}"; shift 2 ;;
      --port=*) PORT="${1#*=}"; shift ;;
      --controller-port) CONTROLLER_PORT="${2:?--controller-port needs a value}"; shift 2 ;;
      --controller-port=*) CONTROLLER_PORT="${1#*=}"; shift ;;
      --sasl-port) SASL_PORT="${2:?--sasl-port needs a value}"; shift 2 ;;
      --sasl-port=*) SASL_PORT="${1#*=}"; shift ;;
      --data-dir) DATA_DIR="${2:?--data-dir needs a value}"; shift 2 ;;
      --data-dir=*) DATA_DIR="${1#*=}"; shift ;;
      --wipe) WIPE=1; shift ;;
      --) shift; EXTRA_ARGS=("$@"); break ;;
      -h|--help) usage; exit 0 ;;
      *) die "unknown option: $1" ;;
    esac
  done
  PORT="${PORT:-$DEFAULT_PORT}"
  [[ "$PORT" =~ ^[0-9]+$ ]] || die "bad --port: $PORT"
  CONTROLLER_PORT="${CONTROLLER_PORT:-$((PORT + 1))}"
  [[ "$CONTROLLER_PORT" =~ ^[0-9]+$ ]] || die "bad --controller-port: $CONTROLLER_PORT"
  [[ "$CONTROLLER_PORT" != "$PORT" ]] || die "--controller-port must differ from --port"
  if [[ -n "$SASL_PORT" ]]; then
    [[ "$SASL_PORT" =~ ^[0-9]+$ ]] || die "bad --sasl-port: $SASL_PORT"
    [[ "$SASL_PORT" != "$PORT" && "$SASL_PORT" != "$CONTROLLER_PORT" ]] || die "--sasl-port must differ from the other ports"
  fi
  DATA_DIR="${DATA_DIR:-$KAFKA_HOME_DIR/data-$PORT}"
  PID_FILE="$DATA_DIR/kafka.pid"
  LOG_FILE="$DATA_DIR/kafka.log"
  PROPS="$DATA_DIR/server.properties"
}

usage() {
  sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

# ---------------------------------------------------------------- helpers --
running_pid() {
  # Prints the broker pid when the pid file names a live Kafka JVM.
  [[ -f "$PID_FILE" ]] || return 1
  local pid
  pid="$(cat "$PID_FILE" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  if [[ -r "/proc/$pid/cmdline" ]] && ! tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q 'kafka\.Kafka'; then
    return 1  # pid was recycled by something else
  fi
  echo "$pid"
}

port_open() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

broker_answers() {
  # The broker logs this once it has joined the quorum and opened its
  # listeners (logger forced to INFO in our log4j2 config).
  grep -q 'Kafka Server started' "$LOG_FILE" 2>/dev/null || return 1
  if [[ "$KCAT" != none ]] && command -v "$KCAT" >/dev/null 2>&1; then
    "$KCAT" -L -b "127.0.0.1:$PORT" -m 5 2>/dev/null | grep -q 'broker 1 at 127.0.0.1' || return 1
  fi
  return 0
}

random_cluster_id() {
  # Same shape as StorageTool random-uuid (URL-safe base64 of 16 random
  # bytes) without paying for a JVM start; ids starting with '-' are avoided
  # just like Kafka's Uuid.randomUuid() does.
  local id
  while :; do
    id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
    [[ "$id" != -* && ${#id} -eq 22 ]] && { echo "$id"; return; }
  done
}

write_configs() {
  local listeners="PLAINTEXT://127.0.0.1:$PORT" advertised="PLAINTEXT://127.0.0.1:$PORT" sasl=""
  if [[ -n "$SASL_PORT" ]]; then
    listeners="$listeners,SASL_PLAINTEXT://127.0.0.1:$SASL_PORT"
    advertised="$advertised,SASL_PLAINTEXT://127.0.0.1:$SASL_PORT"
    sasl="sasl.enabled.mechanisms=PLAIN
listener.name.sasl_plaintext.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username=\"autoglm\" password=\"$SASL_PASSWORD\" user_autoglm=\"$SASL_PASSWORD\";"
  fi
  cat >"$PROPS" <<EOF
# Generated by docker/kafka/kafka.sh -- single-node KRaft broker for dev/CI.
process.roles=broker,controller
node.id=1
listeners=$listeners,CONTROLLER://127.0.0.1:$CONTROLLER_PORT
advertised.listeners=$advertised
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT
$sasl
# Kafka 4.x: dynamic quorum; formatted with --standalone (no controller.quorum.voters).
controller.quorum.bootstrap.servers=127.0.0.1:$CONTROLLER_PORT
log.dirs=$DATA_DIR/logs

# Single node: every internal topic gets one replica.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
min.insync.replicas=1
default.replication.factor=1

group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
num.partitions=1

# Room for 4 MB records plus batch overhead.
message.max.bytes=8388608
replica.fetch.max.bytes=8388608

# Small machine: fewer threads, quick shutdown.
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.retention.hours=24
EOF

  cat >"$DATA_DIR/log4j2.properties" <<EOF
# Generated by docker/kafka/kafka.sh -- WARN to stdout (kafka.log), plus the
# single INFO line kafka.sh waits for.
status = warn
name = autoglm-kafka
appender.stdout.type = Console
appender.stdout.name = STDOUT
appender.stdout.layout.type = PatternLayout
appender.stdout.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.stdout.ref = STDOUT
logger.raftserver.name = kafka.server.KafkaRaftServer
logger.raftserver.level = info
logger.storagetool.name = kafka.tools.StorageTool
logger.storagetool.level = info
EOF
}

java_opts() {
  # shellcheck disable=SC2206
  JAVA_OPTS=($HEAP_OPTS
    -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35
    -XX:+ExplicitGCInvokesConcurrent -XX:+ExitOnOutOfMemoryError
    -Djava.awt.headless=true
    "-Dlog4j2.configurationFile=$DATA_DIR/log4j2.properties"
    "-Dkafka.logs.dir=$DATA_DIR")
}

# --------------------------------------------------------------- commands --
cmd_start() {
  parse_opts "$@"
  check_java
  cmd_fetch

  local pid
  if pid="$(running_pid)"; then
    log "stopping the broker already running from $DATA_DIR (pid $pid)"
    stop_pid "$pid"
  fi
  if port_open "$PORT"; then
    die "port $PORT is already in use by another process"
  fi
  if port_open "$CONTROLLER_PORT"; then
    die "controller port $CONTROLLER_PORT is already in use by another process"
  fi

  # Only ever wipe a directory that kafka.sh created (guards --data-dir typos).
  if [[ -d "$DATA_DIR" && ! -f "$DATA_DIR/.autoglm-kafka" ]] \
      && ! grep -qs 'Generated by docker/kafka/kafka.sh' "$DATA_DIR/server.properties" \
      && [[ -n "$(ls -A "$DATA_DIR" 2>/dev/null)" ]]; then
    die "refusing to wipe $DATA_DIR: not empty and not created by kafka.sh"
  fi
  rm -rf "$DATA_DIR"
  mkdir -p "$DATA_DIR/logs"
  touch "$DATA_DIR/.autoglm-kafka"
  write_configs
  java_opts

  local cluster_id
  cluster_id="$(random_cluster_id)"
  if ! java -Xmx256m -XX:TieredStopAtLevel=1 -XX:+UseSerialGC \
      "-Dlog4j2.configurationFile=$DATA_DIR/log4j2.properties" \
      -cp "$LIB_DIR/*" kafka.tools.StorageTool \
      format -t "$cluster_id" -c "$PROPS" --standalone >>"$LOG_FILE" 2>&1; then
    tail -n 40 "$LOG_FILE" >&2 || true
    die "formatting storage failed"
  fi

  nohup java "${JAVA_OPTS[@]}" -cp "$LIB_DIR/*" kafka.Kafka "$PROPS" \
    </dev/null >>"$LOG_FILE" 2>&1 &
  pid=$!
  echo "$pid" >"$PID_FILE"

  local start now
  start="$(date +%s)"
  while :; do
    if ! kill -0 "$pid" 2>/dev/null; then
      log "broker exited during startup; last log lines:"
      tail -n 60 "$LOG_FILE" >&2 || true
      rm -f "$PID_FILE"
      exit 1
    fi
    if port_open "$PORT" && broker_answers; then
      break
    fi
    now="$(date +%s)"
    if (( now - start >= START_TIMEOUT )); then
      log "broker did not come up within ${START_TIMEOUT}s; last log lines:"
      tail -n 60 "$LOG_FILE" >&2 || true
      stop_pid "$pid"
      exit 1
    fi
    sleep 0.5
  done
  log "Kafka $VERSION up on 127.0.0.1:$PORT (pid $pid) after $(( $(date +%s) - start ))s; log: $LOG_FILE"
  echo "KAFKA_BOOTSTRAP=127.0.0.1:$PORT"
  if [[ -n "$SASL_PORT" ]]; then
    echo "KAFKA_SASL_BOOTSTRAP=127.0.0.1:$SASL_PORT"
  fi
}

stop_pid() {
  local pid="$1" i
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 300; i++)); do  # up to 30 s for a clean shutdown
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "pid $pid ignored SIGTERM for 30s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
  fi
  if kill -0 "$pid" 2>/dev/null; then
    die "pid $pid is still alive"
  fi
  rm -f "$PID_FILE"
}

cmd_stop() {
  parse_opts "$@"
  local pid
  if pid="$(running_pid)"; then
    stop_pid "$pid"
    log "stopped broker on port $PORT (pid $pid)"
  else
    rm -f "$PID_FILE"
    log "no broker running from $DATA_DIR"
  fi
  # --wipe: a throw-away broker (benchmarks on a random port) must not leave its log segments
  # behind (hundreds of MB per run); only a directory kafka.sh created is deleted
  if [[ -n "$WIPE" && -f "$DATA_DIR/.autoglm-kafka" ]]; then
    rm -rf "$DATA_DIR"
    log "deleted $DATA_DIR"
  fi
}

cmd_status() {
  parse_opts "$@"
  local pid
  if pid="$(running_pid)"; then
    if port_open "$PORT"; then
      echo "running pid=$pid bootstrap=127.0.0.1:$PORT version=$VERSION data=$DATA_DIR"
      return 0
    fi
    echo "starting pid=$pid bootstrap=127.0.0.1:$PORT version=$VERSION data=$DATA_DIR"
    return 1
  fi
  echo "stopped bootstrap=127.0.0.1:$PORT data=$DATA_DIR"
  return 3
}

cmd_topics() {
  # Thin wrapper over kafka-topics (org.apache.kafka.tools.TopicCommand), e.g.
  #   kafka.sh topics --port 19092 -- --create --topic t --partitions 3
  parse_opts "$@"
  jars_present || cmd_fetch
  java -Xmx256m -XX:TieredStopAtLevel=1 -XX:+UseSerialGC \
    "-Dlog4j2.level=WARN" -cp "$LIB_DIR/*" org.apache.kafka.tools.TopicCommand \
    --bootstrap-server "127.0.0.1:$PORT" "${EXTRA_ARGS[@]}"
}

main() {
  local cmd="${1:-}"
  [[ $# -gt 0 ]] && shift
  case "$cmd" in
    fetch) check_java; cmd_fetch ;;
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    status) cmd_status "$@" ;;
    topics) cmd_topics "$@" ;;
    -h|--help|help) usage ;;
    *) usage >&2; exit 2 ;;
  esac
}

main "$@"
