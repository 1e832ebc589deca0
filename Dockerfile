# hoopai-proxy as a container: a sidecar next to one app, or one replica of a shared gateway.
#   docker build -t hoopai-proxy .
#   docker run -p 8080:8080 -e HOOPAI_CLIENT_ID=... -e HOOPAI_CLIENT_SECRET=... hoopai-proxy
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
