#!/usr/bin/env bash
# Make a Docker engine and the images local/registry:2.8.2 and local/registry:3.1.0
# available for the tests and the local stack.
#
# Idempotent: installs docker.io when dockerd is missing, starts dockerd when
# `docker info` fails, builds a registry image when it is missing. Nothing is
# pulled (the CI machines have no network to a registry):
#   local/registry:2.8.2  Debian's /usr/bin/docker-registry and the shared libraries it
#                         links; its config at /etc/docker/registry/config.yml, as in the
#                         upstream registry:2.8 image
#   local/registry:3.1.0  distribution 3.x as scripts/registry-v3 finds or builds it (from
#                         ../shared/registry: static, CGO disabled), its config at
#                         /etc/distribution/config.yml, as in the upstream registry:3 image;
#                         skipped, saying so, where there is no ../shared (a user's own
#                         clone) and no REGSWEEP_REGISTRY_V3
#
# Environment:
#   DOCKERD_LOG          where dockerd logs (default /tmp/regsweep-dockerd.log)
#   DOCKERD_TIMEOUT      seconds to wait for the engine (default 60)
#   REGISTRY_IMAGE       tag of the 2.8.2 image (default local/registry:2.8.2)
#   REGSWEEP_REGISTRY_V3 a distribution 3.x binary (default: what ../shared builds)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

DOCKERD_LOG=${DOCKERD_LOG:-/tmp/regsweep-dockerd.log}
DOCKERD_TIMEOUT=${DOCKERD_TIMEOUT:-60}
REGISTRY_IMAGE=${REGISTRY_IMAGE:-local/registry:2.8.2}
REGISTRY_VERSION=2.8.2
REGISTRY_BINARY=/usr/bin/docker-registry
V3_LOCATOR="$here/../scripts/registry-v3"
# Bumped when an image's content changes, so an image built by an older script is rebuilt.
RECIPE=2
RECIPE_3=1
RECIPE_LABEL=io.regsweep.recipe

log() { echo "dockerd.sh: $*" >&2; }
die() { log "$*"; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi
}

install_engine() {
    command -v dockerd >/dev/null 2>&1 && command -v docker >/dev/null 2>&1 && return 0
    log "installing docker.io"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io >/dev/null \
        || die "apt-get install docker.io failed"
}

start_engine() {
    docker info >/dev/null 2>&1 && return 0
    log "starting dockerd (log: $DOCKERD_LOG)"
    # No iptables and no bridge: sandboxes often lack the netfilter modules,
    # and the tests run containers with --network host anyway.
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo -n)
    # setsid: the engine outlives this script and whatever process group ran it.
    "${sudo[@]}" setsid dockerd --iptables=false --bridge=none \
        </dev/null >>"$DOCKERD_LOG" 2>&1 &
    local waited=0
    until docker info >/dev/null 2>&1; do
        [ "$waited" -ge "$DOCKERD_TIMEOUT" ] && {
            tail -n 30 "$DOCKERD_LOG" >&2 || true
            die "dockerd did not answer within ${DOCKERD_TIMEOUT}s"
        }
        sleep 1
        waited=$((waited + 1))
    done
}

copy_with_parents() {  # copy_with_parents FILE ROOTDIR: keep FILE's absolute path under ROOTDIR
    local file=$1 root=$2
    mkdir -p "$root$(dirname "$file")"
    cp -L "$file" "$root$file"
}

write_registry_config() {  # write_registry_config ROOTDIR CONFIG_PATH
    mkdir -p "$1$(dirname "$2")" "$1/var/lib/registry" "$1/tmp"
    cat >"$1$2" <<'YAML'
version: 0.1
log:
  fields:
    service: registry
storage:
  cache:
    blobdescriptor: inmemory
  filesystem:
    rootdirectory: /var/lib/registry
  delete:
    enabled: true
http:
  addr: :5000
  headers:
    X-Content-Type-Options: [nosniff]
YAML
}

add_binary() {  # add_binary BINARY DEST ROOTDIR: BINARY at DEST plus every library it links
    local binary=$1 dest=$2 root=$3 lib
    mkdir -p "$root$(dirname "$dest")"
    cp -L "$binary" "$root$dest"
    # Libraries ldd resolves ("name => /path") and the loader (a bare "/path"); a static
    # binary has none (ldd exits 1: "not a dynamic executable").
    for lib in $( (ldd "$binary" 2>/dev/null || true) | awk '/=> \//{print $3} /^\t\//{print $1}'); do
        copy_with_parents "$lib" "$root"
    done
}

BUILD_DIR=""
trap '[ -z "$BUILD_DIR" ] || rm -rf "$BUILD_DIR"' EXIT

build_registry_image() {  # build_registry_image IMAGE BINARY VERSION CONFIG_PATH RECIPE [ENV]
    local image=$1 binary=$2 version=$3 config=$4 recipe=$5 env=${6:-} have
    have=$(docker image inspect -f "{{index .Config.Labels \"$RECIPE_LABEL\"}}" "$image" 2>/dev/null || true)
    [ "$have" = "$recipe" ] && return 0
    log "building $image from $binary"
    BUILD_DIR=$(mktemp -d)
    add_binary "$binary" /bin/registry "$BUILD_DIR"
    # The official images (alpine) have du, which regsweep measures bytes reclaimed with,
    # and wget, which compose.yaml's healthcheck asks the registry with.
    add_binary "$(command -v du)" /bin/du "$BUILD_DIR"
    command -v wget >/dev/null || as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q wget >/dev/null
    add_binary "$(command -v wget)" /bin/wget "$BUILD_DIR"
    write_registry_config "$BUILD_DIR" "$config"
    local changes=(
        -c 'ENTRYPOINT ["/bin/registry"]'
        -c "CMD [\"serve\",\"$config\"]"
        -c "LABEL org.opencontainers.image.version=$version"
        -c "LABEL $RECIPE_LABEL=$recipe"
    )
    [ -z "$env" ] || changes+=(-c "ENV $env")
    tar -C "$BUILD_DIR" -c . | docker import "${changes[@]}" - "$image" >/dev/null \
        || die "docker import of $image failed"
    rm -rf "$BUILD_DIR"
    BUILD_DIR=""
}

v3_binary() {  # the distribution 3.x binary's path, or nothing (said on stderr)
    local code=0 path
    path=$("$V3_LOCATOR") || code=$?
    case $code in
        0) echo "$path" ;;
        3) log "no local/registry:3.x image (see above)" ;;
        *) die "$V3_LOCATOR failed" ;;
    esac
}

build_registry_3_image() {
    local binary version
    binary=$(v3_binary)
    [ -n "$binary" ] || return 0
    # "... github.com/distribution/distribution/v3 v3.1.0" -> 3.1.0
    version=$("$binary" --version | awk '{print $NF}' | sed 's/^v//')
    case $version in 3.*) ;; *) die "$binary is distribution $version, not 3.x" ;; esac
    # The upstream image sets OTEL_TRACES_EXPORTER=none: 3.x would otherwise try to export
    # traces to localhost:4318 and log every failure.
    build_registry_image "local/registry:$version" "$binary" "$version" \
        /etc/distribution/config.yml "$RECIPE_3" OTEL_TRACES_EXPORTER=none
    REGISTRY_3_IMAGE="local/registry:$version"
}

install_engine
start_engine
[ -x "$REGISTRY_BINARY" ] || die "$REGISTRY_BINARY missing (apt-get install docker-registry)"
build_registry_image "$REGISTRY_IMAGE" "$REGISTRY_BINARY" "$REGISTRY_VERSION" \
    /etc/docker/registry/config.yml "$RECIPE"
REGISTRY_3_IMAGE=""
build_registry_3_image
log "ready: $(docker version --format '{{.Server.Version}}') with $REGISTRY_IMAGE${REGISTRY_3_IMAGE:+ and $REGISTRY_3_IMAGE}"
