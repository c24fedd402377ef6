#!/usr/bin/env bash
# Make a Docker engine and the image local/registry:2.8.2 available for the tests.
#
# Idempotent: installs docker.io when dockerd is missing, starts dockerd when
# `docker info` fails, builds the registry image when it is missing. Nothing is
# pulled (the CI machines have no network to a registry): the image is made
# from Debian's /usr/bin/docker-registry and the shared libraries it links.
#
# Environment:
#   DOCKERD_LOG       where dockerd logs (default /tmp/regsweep-dockerd.log)
#   DOCKERD_TIMEOUT   seconds to wait for the engine (default 60)
#   REGISTRY_IMAGE    tag to build (default local/registry:2.8.2)
set -euo pipefail

DOCKERD_LOG=${DOCKERD_LOG:-/tmp/regsweep-dockerd.log}
DOCKERD_TIMEOUT=${DOCKERD_TIMEOUT:-60}
REGISTRY_IMAGE=${REGISTRY_IMAGE:-local/registry:2.8.2}
REGISTRY_VERSION=2.8.2
REGISTRY_BINARY=/usr/bin/docker-registry
# Bumped when the image's content changes, so an image built by an older script is rebuilt.
RECIPE=2
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

write_registry_config() {
    mkdir -p "$1/etc/docker/registry" "$1/var/lib/registry" "$1/tmp"
    cat >"$1/etc/docker/registry/config.yml" <<'YAML'
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
    # Libraries ldd resolves ("name => /path") and the loader (a bare "/path").
    for lib in $(ldd "$binary" | awk '/=> \//{print $3} /^\t\//{print $1}'); do
        copy_with_parents "$lib" "$root"
    done
}

build_registry_image() {
    local recipe
    recipe=$(docker image inspect -f "{{index .Config.Labels \"$RECIPE_LABEL\"}}" "$REGISTRY_IMAGE" 2>/dev/null || true)
    [ "$recipe" = "$RECIPE" ] && return 0
    [ -x "$REGISTRY_BINARY" ] || die "$REGISTRY_BINARY missing (apt-get install docker-registry)"
    log "building $REGISTRY_IMAGE from $REGISTRY_BINARY"
    BUILD_DIR=$(mktemp -d)
    trap 'rm -rf "$BUILD_DIR"' EXIT
    add_binary "$REGISTRY_BINARY" /bin/registry "$BUILD_DIR"
    # The official image (alpine) has du, which regsweep measures bytes reclaimed with,
    # and wget, which compose.yaml's healthcheck asks the registry with.
    add_binary "$(command -v du)" /bin/du "$BUILD_DIR"
    command -v wget >/dev/null || as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q wget >/dev/null
    add_binary "$(command -v wget)" /bin/wget "$BUILD_DIR"
    write_registry_config "$BUILD_DIR"
    tar -C "$BUILD_DIR" -c . | docker import \
        -c 'ENTRYPOINT ["/bin/registry"]' \
        -c 'CMD ["serve","/etc/docker/registry/config.yml"]' \
        -c "LABEL org.opencontainers.image.version=$REGISTRY_VERSION" \
        -c "LABEL $RECIPE_LABEL=$RECIPE" \
        - "$REGISTRY_IMAGE" >/dev/null || die "docker import failed"
}

install_engine
start_engine
build_registry_image
log "ready: $(docker version --format '{{.Server.Version}}') with $REGISTRY_IMAGE"
