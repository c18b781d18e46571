# payroc-broker container image.
#
#   docker build -t payroc-broker .
#   docker run --rm -p 50051:50051 \
#       -v "$PWD/broker.toml:/etc/payroc-broker/broker.toml:ro" \
#       -e PAYROC_API_KEY_ACME payroc-broker
#
# Inside a container the configuration must listen on all interfaces
# (`[server] listen = "0.0.0.0:50051"`). Try it without a Payroc account:
#   docker run --rm -p 50051:50051 payroc-broker sandbox --listen 0.0.0.0:50051

# --- build ---------------------------------------------------------------------
FROM rust:1-bookworm AS build
WORKDIR /src
# protox compiles proto/ in build.rs, so no system protoc is needed.
COPY . .
RUN cargo build --release --locked \
    && install -m 0755 target/release/payroc-broker /usr/local/bin/payroc-broker

# --- runtime -------------------------------------------------------------------
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin payroc-broker \
    && mkdir -p /etc/payroc-broker
COPY --from=build /usr/local/bin/payroc-broker /usr/local/bin/payroc-broker
USER 10001
EXPOSE 50051
# SIGTERM (docker stop) turns health NOT_SERVING, drains in-flight RPCs, exits 0.
ENTRYPOINT ["payroc-broker"]
CMD ["serve", "--config", "/etc/payroc-broker/broker.toml"]
