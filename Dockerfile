# The sitesync sidecar image (used by docker-compose.yml).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked

# The same with Oracle Instant Client (Basic Light), for an Oracle site:
# docker build --target runtime-oracle . (docker-compose.yml's `oracle`
# profile). The default image, the last stage, has no Oracle software.
FROM debian:bookworm-slim AS runtime-oracle
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl unzip libaio1 \
    && curl -fsSL -o /tmp/ic.zip https://download.oracle.com/otn_software/linux/instantclient/instantclient-basiclite-linuxx64.zip \
    && mkdir -p /opt/oracle && unzip -q /tmp/ic.zip -d /opt/oracle && rm /tmp/ic.zip \
    && ln -s /opt/oracle/instantclient_* /opt/oracle/instantclient \
    && apt-get purge -y curl unzip && rm -rf /var/lib/apt/lists/*
ENV ORACLE_CLIENT_LIB_DIR=/opt/oracle/instantclient
COPY --from=build /src/target/release/sitesync /usr/local/bin/sitesync
WORKDIR /sitesync
COPY connectors ./connectors
COPY config ./config
VOLUME /sitesync/checkpoints
ENTRYPOINT ["sitesync"]

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/sitesync /usr/local/bin/sitesync
WORKDIR /sitesync
COPY connectors ./connectors
COPY config ./config
VOLUME /sitesync/checkpoints
ENTRYPOINT ["sitesync"]
