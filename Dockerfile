# One image for every lunastor daemon (lunastor-meta, lunastor-chunk, lunastor-redirector) and
# the lunastor CLI. docker-compose.yml runs the same dev cluster that `lunastor dev up` runs.
FROM python:3.11-slim-bookworm

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        iproute2 iputils-arping libiscsi-bin \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY lunastor ./lunastor
RUN pip install --no-cache-dir .

# iSCSI portal, chunk data port, meta REST API, admin (/metrics, /healthz)
EXPOSE 3260 3270 8080 9100 9101
VOLUME ["/var/lib/lunastor"]
CMD ["lunastor", "--help"]
