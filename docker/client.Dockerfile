# An iSCSI client host for docker-compose.yml (profile `client`): libiscsi's tools, qemu-img with
# its iSCSI driver, and tests/tools/verified_writer.c built as verified-writer.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE} AS build
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        libc6-dev libiscsi-dev tcc \
    && rm -rf /var/lib/apt/lists/*
COPY tests/tools/verified_writer.c /src/
# tcc: a test tool's compiler, an eighth of gcc's download
RUN tcc -Wall -o /usr/local/bin/verified-writer /src/verified_writer.c -liscsi

FROM ${BASE_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates curl iproute2 libiscsi-bin qemu-block-extra qemu-utils \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/verified-writer /usr/local/bin/
# under `docker exec` its parent is runc, which exits once it runs (tests/tools/verified_writer.c)
ENV VERIFIED_WRITER_NO_PDEATHSIG=1
CMD ["sleep", "infinity"]
