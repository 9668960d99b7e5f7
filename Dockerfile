# One image for every lunastor daemon (lunastor-meta, lunastor-chunk, lunastor-redirector) and
# the lunastor CLI. docker-compose.yml runs the same dev cluster that `lunastor dev up` runs.
# Debian 12 with Debian's Python 3.11; lunastor and its dependencies from PyPI in /opt/lunastor.
# Where debian:bookworm-slim cannot be pulled, scripts/docker-base-image.sh builds it from
# Debian's packages (make compose-test runs it).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

# iproute2 and arping: the redirector adds the VIP and announces it; libiscsi-bin: iscsi-ls
# and friends for trying the portal from inside; curl: health checks and the REST API.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates curl iproute2 iputils-arping libiscsi-bin python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

ENV PATH=/opt/lunastor/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/lunastor

# The dependencies first, in their own layer: editing lunastor/ does not download them again.
WORKDIR /src
COPY pyproject.toml ./
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > requirements.txt \
    && pip install -r requirements.txt
COPY README.md ./
COPY lunastor ./lunastor
RUN pip install --no-deps . && rm -rf /src/build

# iSCSI portal, chunk data port, meta REST API, admin (/metrics, /healthz)
EXPOSE 3260 3270 8080 9100 9101
CMD ["lunastor", "--help"]
