# pacsd container image.
#
#   docker build -t pacsd .
#   docker run -d --name pacsd -p 11112:11112 -p 8042:8042 -v pacsd-data:/var/lib/pacsd pacsd
#
# or `docker compose up -d` with docker-compose.yml. Configure with PACSD_<SECTION>__<KEY>
# environment variables (every key is documented in config/pacsd.toml), or mount a TOML file
# and run `pacsd serve --config /path/to/pacsd.toml`.

# ---- build: install pacsd and its dependencies into a virtualenv -------------------------
FROM python:3.11-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/pacsd/.venv

WORKDIR /src
# Only what the wheel is built from; .dockerignore keeps the rest of the tree out.
COPY pyproject.toml README.md ./
COPY pacsd ./pacsd
RUN /opt/pacsd/.venv/bin/pip install .

# ---- runtime ------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm

# A dedicated unprivileged user with a fixed id (10001), so files on the data volume keep the
# same owner across rebuilds; USER below names it by number so that the host and orchestrators
# (Kubernetes runAsNonRoot) can tell it is not root without reading /etc/passwd.
RUN groupadd --system --gid 10001 pacsd \
 && useradd --system --uid 10001 --gid pacsd \
        --home-dir /var/lib/pacsd --no-create-home --shell /usr/sbin/nologin pacsd \
 && install -d -o pacsd -g pacsd -m 0750 /var/lib/pacsd

COPY --from=build /opt/pacsd/.venv /opt/pacsd/.venv

ENV PATH=/opt/pacsd/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PACSD_STORAGE__DATA_DIR=/var/lib/pacsd \
    PACSD_DATABASE__URL=sqlite+aiosqlite:////var/lib/pacsd/index.db \
    PACSD_HTTP__BIND=0.0.0.0

WORKDIR /var/lib/pacsd
# Blobs, spool and the SQLite index live here: keep it on a volume.
VOLUME ["/var/lib/pacsd"]

USER 10001:10001

# 11112: DICOM (DIMSE), 8042: HTTP (DICOMweb under /dicom-web, WADO-URI at /wado)
EXPOSE 11112 8042

# A C-ECHO to ourselves: the DICOM listener is up and answers associations. Follows the AE
# title and port when they are changed through the environment. With
# PACSD_DICOM__REQUIRE_KNOWN_CALLERS=true the probe's calling AE must be a configured peer.
# Shell form on purpose, to expand those variables; a probe receives no signals.
# hadolint ignore=DL3025
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
    CMD pacsd echo 127.0.0.1 "${PACSD_DICOM__PORT:-11112}" \
        --aec "${PACSD_DICOM__AE_TITLE:-PACSD}" || exit 1

# pacsd finishes open associations for dicom.shutdown_grace (10 s) after SIGTERM; give
# `docker stop` a longer timeout than that (docker-compose.yml uses stop_grace_period: 15s).
STOPSIGNAL SIGTERM
CMD ["pacsd", "serve"]
