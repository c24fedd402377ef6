# regsweep: one image for the service, the workers and beat (the command picks the role).
#
# BASE_IMAGE is any Debian-based image with python3 (3.11 or later) and its venv
# module. compose.yaml builds on the upstream python image; scripts/images builds
# on a local Debian image where upstream images cannot be pulled.
ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE}

ENV PATH=/opt/regsweep/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    REGSWEEP_CACHE_DIR=/var/lib/regsweep/cache
WORKDIR /src

# The dependencies in a layer of their own, so that a source change reinstalls
# only regsweep itself.
COPY pyproject.toml constraints.txt ./
RUN python3 -m venv /opt/regsweep \
    && python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' >requirements.txt \
    && pip install --no-cache-dir -c constraints.txt -r requirements.txt

COPY README.md ./
COPY regsweep ./regsweep
COPY service ./service
COPY worker ./worker
RUN pip install --no-cache-dir -c constraints.txt . \
    && rm -rf /src/build

# Not root. The state a process keeps on disk (beat's schedule, the CLI's caches
# and JSONL audit log) goes under /var/lib/regsweep, which compose.yaml mounts
# as a volume: a named volume starts with this directory's owner.
RUN useradd --system --home-dir /var/lib/regsweep --shell /usr/sbin/nologin regsweep \
    && install -d -o regsweep -g regsweep /var/lib/regsweep
USER regsweep
WORKDIR /var/lib/regsweep
ENTRYPOINT ["regsweep", "-c", "/etc/regsweep/regsweep.yaml"]
CMD ["check-config"]
