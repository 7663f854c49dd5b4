# The sitesync sidecar image (used by docker-compose.yml).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/sitesync /usr/local/bin/sitesync
WORKDIR /sitesync
COPY connectors ./connectors
COPY config ./config
VOLUME /sitesync/checkpoints
ENTRYPOINT ["sitesync"]
