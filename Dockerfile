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
# Pinned: a rebuild gets the supervisord and Flower this image was tested with.
RUN pip install . "supervisor==4.3.0" "flower==2.2.0"
COPY deploy ./deploy

# supervisord's log files, pid file and control socket (deploy/supervisord.conf), and the
# answer journal ($SMS_RUN_DIR/journal: docker-compose.yml mounts a volume there, which takes
# this directory's owner when it is first created - the worker must be able to write it)
ENV SMS_RUN_DIR=/tmp/polyv-sms
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin sms \
    && mkdir -p "$SMS_RUN_DIR/journal" \
    && chown sms "$SMS_RUN_DIR" "$SMS_RUN_DIR/journal" \
    && chmod 0700 "$SMS_RUN_DIR" "$SMS_RUN_DIR/journal"
USER sms

# 9100-9101 worker metrics, 8080 simulator, 5555 Flower
EXPOSE 9100 9101 8080 5555
# Healthy when every worker process (numprocs in deploy/supervisord.conf) answers a ping over
# the broker: supervisord itself stays up when its workers are FATAL. docker-compose.yml turns
# it off for the simulator and Flower, which run other commands from this image.
HEALTHCHECK --interval=30s --timeout=15s --start-period=30s --retries=3 \
    CMD ["polyv-sms", "healthcheck", "--processes", "2"]
CMD ["supervisord", "-n", "-c", "deploy/supervisord.conf"]
