# polyv-sms worker image: the package, supervisord and Flower; runs as an unprivileged user.
# docker compose (docker-compose.yml) builds it for the worker, the simulator and Flower.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY polyv_sms ./polyv_sms
RUN pip install . "supervisor>=4.2" "flower>=2.0"
COPY deploy ./deploy

# supervisord's log files, pid file and control socket (deploy/supervisord.conf)
ENV SMS_RUN_DIR=/tmp/polyv-sms
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin sms \
    && mkdir -p "$SMS_RUN_DIR" \
    && chown sms "$SMS_RUN_DIR" \
    && chmod 0700 "$SMS_RUN_DIR"
USER sms

# 9100-9101 worker metrics, 8080 simulator, 5555 Flower
EXPOSE 9100 9101 8080 5555
CMD ["supervisord", "-n", "-c", "deploy/supervisord.conf"]
