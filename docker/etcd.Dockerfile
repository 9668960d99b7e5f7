# etcd for docker-compose.yml, from Debian's etcd-server package (no third-party image).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates curl etcd-server \
    && rm -rf /var/lib/apt/lists/*
EXPOSE 2379 2380
CMD ["etcd", "--data-dir=/etcd-data"]
