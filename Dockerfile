# First version: builds the wheel in one stage and runs it as a non-root user in another.
FROM python:3.11.14-slim-bookworm AS builder
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY notifier ./notifier
COPY templates ./templates
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11.14-slim-bookworm
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 10001 notifier
COPY --from=builder /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER notifier
EXPOSE 8080
# The slim image has no curl; Python's urllib probes /healthz on NOTIFIER_HTTP_PORT.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('NOTIFIER_HTTP_PORT', '8080') + '/healthz', timeout=4)"]
ENTRYPOINT ["notifier"]
CMD ["run"]
