# hoopai-proxy as a container: a sidecar next to one app, or one replica of a shared gateway.
#   docker build -t hoopai-proxy .
# The container listens on 0.0.0.0 and has no caller keys, so it refuses to start until you
# choose who may reach it (a proxy holding every sub-account's tokens must not be an open
# relay):
#  - a sidecar sharing the app's network namespace (a Kubernetes pod, or docker run
#    --network container:APP): listen on loopback only, -e HOOPAI_PROXY_HOST=127.0.0.1;
#  - a sidecar on a private network only its app can reach: -e HOOPAI_TRUST_NETWORK=true
#    (logged as a warning at start);
#  - anything else: mount a config with callers (config/gateway.yaml shows how).
#   docker run -p 8080:8080 -e HOOPAI_CLIENT_ID=... -e HOOPAI_CLIENT_SECRET=... \
#     -e HOOPAI_TRUST_NETWORK=true hoopai-proxy
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY config ./config
RUN pip install --no-cache-dir . && useradd --system --home /app proxy \
    && mkdir -p /app/data && chown proxy /app/data
USER proxy

# Inside a container the proxy must listen on all interfaces to be reachable.
ENV HOOPAI_PROXY_CONFIG=/app/config/proxy.yaml HOOPAI_PROXY_HOST=0.0.0.0
EXPOSE 8080
STOPSIGNAL SIGTERM
ENTRYPOINT ["hoopai-proxy"]
CMD ["serve"]
