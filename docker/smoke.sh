#!/usr/bin/env bash
# End-to-end check of the CPU image and the compose stack, on loopback only:
#   1. base image: the public one (python:3.11-slim) if it is here or can be pulled, otherwise
#      a local one made with debootstrap + `docker import` (offline build farms);
#   2. build the Tandem image and a Redis image (host networking, nothing published);
#   3. generate the tiny model into a temporary folder (mounted read-only as the model volume);
#   4. bring up redis + router + 2 prefill + 2 decode workers, wait for /health to see all 4;
#   5. loadgen: >= 50 requests, all must succeed;
#   6. kill one decode container while requests are in flight: they, and a round sent after
#      it, must all succeed;
#   7. tear down and remove everything it created (containers, volumes, networks, images,
#      temporary files), then check that nothing is left and print the wall time.
#
# Needs: a running Docker engine, docker compose (v2 plugin) or docker-compose (v1), python3,
# curl; debootstrap (and root or sudo) when the public base image cannot be pulled.
# Settings: TANDEM_SMOKE_BASE (public base, default python:3.11-slim), TANDEM_SMOKE_REQUESTS
# (default 50), TANDEM_TORCH_WHEEL (a local torch wheel; default: found in pip's find-links),
# DEBIAN_MIRROR (for debootstrap, default http://deb.debian.org/debian), CA certificates for a
# TLS-inspecting proxy: TANDEM_SMOKE_CA_DIR (default /usr/local/share/ca-certificates).
set -euo pipefail

START=$(date +%s)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ID="tandem-smoke-$(date +%s)-$$"
BASE_PUBLIC=${TANDEM_SMOKE_BASE:-python:3.11-slim}
REQUESTS=${TANDEM_SMOKE_REQUESTS:-50}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA_DIR=${TANDEM_SMOKE_CA_DIR:-/usr/local/share/ca-certificates}
IMAGE="$ID:cpu"
REDIS_IMG="$ID:redis"
CREATED_IMAGES=()
WORK=""
COMPOSE=()

log() { echo "[smoke +$(($(date +%s) - START))s] $*"; }
die() {
    log "FAIL: $*"
    exit 1
}
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

# --- preconditions ----------------------------------------------------------------------
command -v docker >/dev/null || die "no docker client"
docker info >/dev/null 2>&1 || die "no usable Docker engine (docker info failed)"
if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null; then
    COMPOSE=(docker-compose)
else
    die "neither 'docker compose' nor 'docker-compose' is installed"
fi
command -v curl >/dev/null || die "curl is needed"
# The classic builder: it needs no buildx plugin and no frontend image from a registry.
export DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0

WORK=$(mktemp -d "/tmp/$ID.XXXXXX")
chmod 755 "$WORK" # the containers' user (uid 10001) reads the model under it
DANGLING_BEFORE=$(docker images -q --filter dangling=true | sort -u)

compose() { "${COMPOSE[@]}" -p "$ID" -f "$ROOT/docker/compose.yaml" "$@"; }

cleanup() {
    local rc=$?
    set +e
    if [ ${#COMPOSE[@]} -gt 0 ] && [ -n "$WORK" ]; then
        if [ $rc != 0 ]; then
            log "logs of the stack (last 40 lines per container):"
            compose logs --tail 40 2>&1 | tail -300
        fi
        log "tearing down"
        compose --profile loadgen down -v --remove-orphans --timeout 10 >/dev/null 2>&1
    fi
    for image in "${CREATED_IMAGES[@]}"; do docker rmi -f "$image" >/dev/null 2>&1; done
    # intermediate images of multi-stage builds (untagged) that this run made
    comm -13 <(echo "$DANGLING_BEFORE") <(docker images -q --filter dangling=true | sort -u) |
        xargs -r docker rmi -f >/dev/null 2>&1
    [ -n "$WORK" ] && { rm -rf "$WORK" 2>/dev/null || $SUDO rm -rf "$WORK"; }
    local left
    left=$(
        docker ps -aq --filter "label=com.docker.compose.project=$ID"
        docker volume ls -q --filter "label=com.docker.compose.project=$ID"
        docker network ls -q --filter "label=com.docker.compose.project=$ID"
        docker images -q "$ID"
    )
    if [ -n "$left" ]; then
        log "LEFT BEHIND: $left"
        [ $rc = 0 ] && rc=1
    fi
    [ -n "$WORK" ] && [ -e "$WORK" ] && { log "LEFT BEHIND: $WORK"; [ $rc = 0 ] && rc=1; }
    log "$([ $rc = 0 ] && echo PASS || echo FAIL) (exit $rc); wall time $(($(date +%s) - START)) s"
    exit $rc
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# --- 1. base image ----------------------------------------------------------------------
if docker image inspect "$BASE_PUBLIC" >/dev/null 2>&1; then
    BASE=$BASE_PUBLIC
    log "base image $BASE (already here)"
elif timeout 120 docker pull "$BASE_PUBLIC" >/dev/null 2>&1; then
    BASE=$BASE_PUBLIC
    CREATED_IMAGES+=("$BASE")
    log "base image $BASE (pulled)"
else
    log "cannot pull $BASE_PUBLIC: making a local base with debootstrap ($MIRROR)"
    command -v debootstrap >/dev/null || die "debootstrap is needed (apt-get install debootstrap)"
    BASE="$ID:base"
    $SUDO debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
        { tail -20 "$WORK/debootstrap.log"; die "debootstrap failed"; }
    $SUDO tar -C "$WORK/rootfs" -c . | docker import - "$BASE" >/dev/null
    CREATED_IMAGES+=("$BASE")
    $SUDO rm -rf "$WORK/rootfs"
    log "base image $BASE (debootstrap bookworm, imported)"
fi

# --- 2. images --------------------------------------------------------------------------
# Build context: the working tree's files (tracked, and untracked that git does not ignore),
# plus docker/build-extra/ (CA certificates, a local torch wheel), which exists only here.
CTX="$WORK/context"
mkdir -p "$CTX/docker/build-extra/ca" "$CTX/docker/build-extra/wheels"
(cd "$ROOT" && git ls-files -co --exclude-standard -z | tar --null -T - --ignore-failed-read -cf - 2>/dev/null) |
    tar -C "$CTX" -xf -
if compgen -G "$CA_DIR/*.crt" >/dev/null; then cp "$CA_DIR"/*.crt "$CTX/docker/build-extra/ca/"; fi
PYTAG=$(docker run --rm --network none "$BASE" python3 -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
WHEEL=${TANDEM_TORCH_WHEEL:-}
if [ -z "$WHEEL" ]; then
    for dir in ${PIP_FIND_LINKS:-} $(python3 -m pip config get global.find-links 2>/dev/null || true) /opt/wheels; do
        found=$(find "$dir" -maxdepth 1 -name "torch-2.13.0*-$PYTAG-*.whl" 2>/dev/null | head -1)
        if [ -n "$found" ]; then WHEEL=$found; break; fi
    done
fi
if [ -n "$WHEEL" ]; then
    ln "$WHEEL" "$CTX/docker/build-extra/wheels/" 2>/dev/null || cp "$WHEEL" "$CTX/docker/build-extra/wheels/"
    log "torch from the local wheel $(basename "$WHEEL")"
else
    log "no local torch wheel for $PYTAG: torch comes from the CPU index"
fi

log "building $IMAGE"
docker build --network host --build-arg "BASE_IMAGE=$BASE" -f "$CTX/docker/Dockerfile.cpu" \
    -t "$IMAGE" "$CTX" >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; die "image build failed"; }
CREATED_IMAGES+=("$IMAGE")
rm -rf "$CTX"

if docker image inspect redis:7-alpine >/dev/null 2>&1; then
    REDIS_IMG=redis:7-alpine
else
    log "building $REDIS_IMG (Debian's redis-server on $BASE)"
    printf '%s\n' "FROM $BASE" \
        "RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server && rm -rf /var/lib/apt/lists/*" \
        "USER redis" |
        docker build --network host -t "$REDIS_IMG" - >"$WORK/build-redis.log" 2>&1 ||
        { tail -20 "$WORK/build-redis.log"; die "redis image build failed"; }
    CREATED_IMAGES+=("$REDIS_IMG")
fi

# --- 3. the model volume ----------------------------------------------------------------
mkdir -p "$WORK/model" "$WORK/results1" "$WORK/results2"
docker run --rm --network none -u "$(id -u):$(id -g)" -e TANDEM_CACHE_DIR=/tmp/cache \
    -v "$WORK/model:/out" "$IMAGE" make-tiny-model /out >/dev/null
chmod -R a+rX "$WORK/model"
log "tiny model generated"

# --- 4. the stack -----------------------------------------------------------------------
HTTP_PORT=$(free_port)
REDIS_PORT=$(free_port)
USER_GROUP="$(id -u):$(id -g)"
export TANDEM_IMAGE="$IMAGE" REDIS_IMAGE="$REDIS_IMG" TANDEM_MODEL_DIR="$WORK/model" \
    TANDEM_HTTP_PORT="$HTTP_PORT" TANDEM_REDIS_PORT="$REDIS_PORT" \
    TANDEM_LOADGEN_USER="$USER_GROUP" TANDEM_LOADGEN_OUT="$WORK/results1"
# Router and workers prove a shared secret on every control connection (tandem.auth).
export TANDEM_CLUSTER_SECRET="${TANDEM_CLUSTER_SECRET:-$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')}"
URL="http://127.0.0.1:$HTTP_PORT"
log "starting redis (:$REDIS_PORT), 2 prefill, 2 decode, router ($URL)"
compose up -d --no-build --scale prefill=2 --scale decode=2 >"$WORK/up.log" 2>&1 ||
    { cat "$WORK/up.log"; die "compose up failed"; }

workers() { curl -s -m 5 "$URL/health" | python3 -c 'import json,sys; print(json.load(sys.stdin)["workers"])' 2>/dev/null || echo 0; }
wait_workers() { # wait_workers N SECONDS
    local deadline=$(($(date +%s) + $2))
    until [ "$(workers)" = "$1" ]; do
        [ "$(date +%s)" -lt $deadline ] || die "/health did not report $1 workers within $2 s (last: $(workers))"
        sleep 1
    done
}
wait_workers 4 300
log "/health: 200, 4 workers"

# --- 5. load ----------------------------------------------------------------------------
HAVE_LOADGEN=0
if docker run --rm --network none "$IMAGE" loadgen --help >/dev/null 2>&1; then HAVE_LOADGEN=1; fi

load() { # load N OUTDIR [OUTPUT_LEN]: N requests, all must succeed
    local out_len=${3:-32}
    if [ $HAVE_LOADGEN = 1 ]; then
        TANDEM_LOADGEN_OUT="$2" LOADGEN_NUM_REQUESTS="$1" LOADGEN_OUTPUT_LEN="$out_len" \
            compose --profile loadgen run -T --rm loadgen >"$2.log" 2>&1 ||
            { tail -20 "$2.log"; return 1; }
        python3 - "$2/results.json" "$1" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
want = int(sys.argv[2])
print(f"loadgen: completed={r['completed']} errors={r['errors']}")
sys.exit(0 if r["completed"] == want and r["errors"] == 0 else 1)
EOF
    else # until `tandem loadgen` exists in this tree: the same shape of load with curl
        seq "$1" | xargs -P 16 -I{} curl -s -m 120 -o /dev/null -w '%{http_code}\n' \
            "$URL/v1/completions" -H 'Content-Type: application/json' \
            ${TANDEM_API_KEY:+-H "Authorization: Bearer ${TANDEM_API_KEY%%,*}"} \
            -d '{"prompt": "smoke request {} with a prompt of some length", "max_tokens": '"$out_len"', "ignore_eos": true}' \
            >"$2/codes"
        local ok
        ok=$(grep -c '^200$' "$2/codes" || true)
        echo "curl: $ok/$1 answered 200 ($(sort "$2/codes" | uniq -c | tr '\n' ' '))"
        [ "$ok" = "$1" ]
    fi
}
[ $HAVE_LOADGEN = 1 ] || log "NOTE: this tree has no 'tandem loadgen' yet: sending the load with curl"
load "$REQUESTS" "$WORK/results1" || die "not every request succeeded"
log "$REQUESTS requests, all succeeded"

# --- 6. lose a decode worker under load -------------------------------------------------
VICTIM=$(docker ps -q --filter "label=com.docker.compose.project=$ID" \
    --filter "label=com.docker.compose.service=decode" | head -1)
[ -n "$VICTIM" ] || die "no decode container found"
# twice the requests, four times the tokens: the load outlasts the kill by several seconds
load $((2 * REQUESTS)) "$WORK/results2" 128 >"$WORK/under-kill.out" 2>&1 &
LOAD_PID=$!
sleep 2
docker kill "$VICTIM" >/dev/null
log "killed decode container ${VICTIM:0:12} with requests in flight"
wait $LOAD_PID || { cat "$WORK/under-kill.out"; die "requests in flight when a decode worker died failed"; }
log "in flight during the kill: $(tail -1 "$WORK/under-kill.out")"
RERUNS=$(curl -s -m 5 "$URL/metrics" | awk '$1 == "tandem_router_reruns_total" {print $2}')
log "router: ${RERUNS:-?} requests continued on another worker after theirs died"
wait_workers 3 60
log "/health: 3 workers"
rm -rf "$WORK/results2" && mkdir -p "$WORK/results2"
load "$REQUESTS" "$WORK/results2" || die "requests after the kill failed"
log "$REQUESTS more requests after the kill, all succeeded"
