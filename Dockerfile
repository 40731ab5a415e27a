# The builder makes the wheel and installs it, with its dependencies, into a virtualenv; the
# final image copies only that virtualenv, so no source tree, wheel or pip cache ships in it.
# Both stages use the same base image: the virtualenv's interpreter links to its Python.
FROM python:3.11.15-slim-bookworm AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md LICENSE constraints.txt ./
COPY notifier ./notifier
COPY templates ./templates
# constraints.txt holds the versions the test suite passed with (see .ci/lock): the image
# installs exactly those, its build backend included.
RUN pip install --no-cache-dir --upgrade --constraint constraints.txt pip \
    && pip wheel --no-cache-dir --no-deps --build-constraint constraints.txt \
        --wheel-dir /wheels . \
    && python -m venv /opt/notifier \
    && /opt/notifier/bin/pip install --no-cache-dir --constraint constraints.txt /wheels/*.whl

FROM python:3.11.15-slim-bookworm
LABEL org.opencontainers.image.title="chamelaion-notifier" \
      org.opencontainers.image.description="Tells Slack and HTTP webhooks when a Chamelaion lip sync request completes or fails." \
      org.opencontainers.image.licenses="MIT"
# The code is compiled at install time and the root filesystem may be read-only (Kubernetes),
# so Python must not try to write bytecode at run time.
ENV PATH=/opt/notifier/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# A fixed numeric uid, so Kubernetes' runAsNonRoot can verify it and runAsUser can match it.
RUN groupadd --gid 10001 notifier \
    && useradd --uid 10001 --gid notifier --no-create-home --no-log-init \
        --home-dir /nonexistent --shell /usr/sbin/nologin notifier
# Owned by root: the service cannot modify its own code.
COPY --from=builder /opt/notifier /opt/notifier
USER 10001:10001
EXPOSE 8080
# On SIGTERM the service stops polling at once and exits 0 within 9 s: inside docker stop's 10 s.
STOPSIGNAL SIGTERM
# `notifier healthcheck` reads the settings as `notifier run` does (flag > environment > the
# TOML file of NOTIFIER_CONFIG > default), so it probes /healthz on the port the service
# listens on, and exits 1 on a refused connection, a timeout or a status other than 2xx.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["notifier", "healthcheck"]
ENTRYPOINT ["notifier"]
CMD ["run"]
