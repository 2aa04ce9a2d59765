# Parley's production image: slim, non-root, served by gunicorn.conf.py.
# Not built on the project's own machines (no Docker there); linted by hadolint.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PORT=8000

WORKDIR /app
RUN groupadd --system --gid 10001 parley && useradd --system --uid 10001 --gid 10001 --home-dir /app --shell /usr/sbin/nologin parley

# Dependencies first, so that a code change reuses this layer.
COPY requirements.txt ./
RUN pip install -r requirements.txt

COPY . .
# The `parley` command (Flask's CLI for main:create_app), linked to /app.
RUN pip install --no-deps -e . && chown -R parley:parley /app

USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('PORT', '8000')}/healthz\", timeout=4)"]
CMD ["gunicorn", "-c", "gunicorn.conf.py", "main:create_app()"]
