# The edgemeter sidecar: mitmdump with the meter in reverse mode, as user 10001, on a
# read-only root filesystem. The only writable path is the volume /var/lib/edgemeter: the spool
# and mitmproxy's confdir (its CA) are made inside it at the first start.
# Build: docker build -t edgemeter . ; settings: EDGEMETER_* and MITMPROXY_* environment
# variables (docs/CONTAINER.md). tests/test_container.py runs this file's builder stage (a fresh
# venv from the same locks) and the entrypoint, so keep RUN lines free of absolute paths: they
# use the ENV paths below.

FROM python:3.12-slim AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BUILD_VENV=/opt/build \
    VIRTUAL_ENV=/opt/venv
WORKDIR /src
COPY requirements/ requirements/
# Every dependency, and the build backend, comes from a lock with hashes. Wheels are made once in
# a build venv (nkeys publishes no wheel: it is built from its hash-checked sdist with the pinned
# setuptools), so nothing unpinned is fetched; the runtime venv installs offline from them.
RUN python -m venv "$BUILD_VENV" \
    && "$BUILD_VENV/bin/pip" install --require-hashes --only-binary=:all: -r requirements/build.txt \
    && "$BUILD_VENV/bin/pip" wheel --require-hashes --no-build-isolation --wheel-dir wheels \
        -r requirements/lock.txt
COPY pyproject.toml README.md ./
COPY edgemeter/ edgemeter/
COPY spool/ spool/
# pip check proves the lock has every dependency the project declares.
RUN "$BUILD_VENV/bin/pip" wheel --no-deps --no-build-isolation --wheel-dir wheels . \
    && python -m venv "$VIRTUAL_ENV" \
    && "$VIRTUAL_ENV/bin/pip" install --no-index --find-links wheels edgemeter \
    && "$VIRTUAL_ENV/bin/pip" check

FROM python:3.12-slim
LABEL org.opencontainers.image.title="edgemeter" \
      org.opencontainers.image.description="Meters LLM API traffic: a mitmproxy sidecar that publishes usage envelopes to NATS JetStream" \
      org.opencontainers.image.licenses="Apache-2.0"
# Numeric ids (USER below), so Kubernetes' runAsNonRoot can check them. The volume's mount point
# belongs to the user, so Docker's anonymous volume is writable; everything else stays root's.
RUN groupadd --system --gid 10001 edgemeter \
    && useradd --system --no-log-init --uid 10001 --gid 10001 --home-dir /nonexistent \
        --no-create-home --shell /usr/sbin/nologin edgemeter \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/edgemeter
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    EDGEMETER_SPOOL_DIR=/var/lib/edgemeter/spool \
    MITMPROXY_CONFDIR=/var/lib/edgemeter/mitmproxy \
    EDGEMETER_LISTEN_PORT=8086 \
    EDGEMETER_ADMIN_LISTEN=0.0.0.0:9464
# The spool is a directory inside the volume, not the volume itself: the meter makes it 0700,
# and only a directory's owner may chmod it, while a Kubernetes volume's root belongs to root.
VOLUME ["/var/lib/edgemeter"]
WORKDIR /app
USER 10001:10001
EXPOSE 8086 9464
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 CMD ["edgemeter-healthcheck"]
# Exec form, no shell: the entrypoint checks the variables and execs mitmdump, which stays PID 1,
# so SIGTERM reaches its handler and the meter drains its spool before the container stops.
ENTRYPOINT ["edgemeter-container"]
