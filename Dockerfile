# The clstr image: the `clstr` command with the package and its demo app.
# Build: docker build -t clstr .   Run a node: docker run clstr node --id n1 --app ...
# Your own service: FROM this image, COPY your module into /app, set CLSTR_APP.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY clstr ./clstr
RUN pip install . \
    && useradd --system --no-create-home --shell /usr/sbin/nologin clstr \
    && rm -rf /src

# `clstr node` imports --app from its working directory (--app-dir, default .).
WORKDIR /app
USER clstr
# Prometheus metrics of `clstr node --metrics-port 9100`.
EXPOSE 9100
# Logs as JSON lines, the format log collectors read.
ENV CLSTR_LOG_JSON=1

ENTRYPOINT ["clstr"]
CMD ["--help"]
