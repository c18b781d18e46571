# payroc-broker container image: a static-ish Rust binary on distroless.
#
#   docker build -t payroc-broker .
#   docker run --rm --read-only -p 50051:50051 \
#       -v "$PWD/broker.toml:/etc/payroc-broker/broker.toml:ro" \
#       -v "$PWD/keys:/etc/payroc-broker/keys:ro" payroc-broker
#
# Inside a container the configuration must listen on all interfaces
# (`[server] listen = "0.0.0.0:50051"`). The production image is built without
# the default `sandbox` feature (no simulated Payroc, no HTTP simulator
# server in the binary). For a demo image with `payroc-broker sandbox`:
#   docker build --build-arg CARGO_FEATURE_FLAGS= -t payroc-broker:sandbox .
#   docker run --rm -p 50051:50051 payroc-broker:sandbox sandbox --listen 0.0.0.0:50051
#
# The image is read-only-root friendly: the broker writes nothing to disk
# (logs go to stderr), so `--read-only` / readOnlyRootFilesystem need no tmpfs.
# .ci/run lints this file with hadolint; it is not built there (no Docker
# engine on the CI machine).

# --- build ---------------------------------------------------------------------
FROM rust:1.95-bookworm AS build
# "--no-default-features" leaves the sandbox out of production images.
ARG CARGO_FEATURE_FLAGS="--no-default-features"
WORKDIR /src

# Dependencies first, in their own layer: this layer is rebuilt only when the
# manifest, lock file or proto change, not on every source edit. Stub sources
# stand in for the crate. Every [[bin]], [[bench]], [[example]] and [[test]]
# that Cargo.toml declares needs a file (Cargo refuses the manifest, or a
# build with the sandbox feature fails, otherwise), so each gets an empty
# stub at its `path` or default place; the names come from Cargo.toml so that
# a new target does not break the image. Only the library and binaries are
# compiled here.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY third_party third_party
RUN mkdir -p src benches examples tests \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && awk 'function stub(file) { if (file != "") { d = file; sub(/\/[^\/]*$/, "", d); \
                                                    system("mkdir -p \"" d "\""); \
                                                    print "fn main() {}" > file } } \
            /^\[/ { stub(path != "" ? path : (dir != "" && name != "" ? dir "/" name ".rs" : "")); \
                    dir = ""; name = ""; path = "" } \
            /^\[\[bin\]\]/ { dir = "src/bin" } \
            /^\[\[bench\]\]/ { dir = "benches" } \
            /^\[\[example\]\]/ { dir = "examples" } \
            /^\[\[test\]\]/ { dir = "tests" } \
            dir != "" && ($1 == "name" || $1 == "path") { v = $3; gsub(/"/, "", v); \
                                                         if ($1 == "name") name = v; else path = v } \
            END { stub(path != "" ? path : (dir != "" && name != "" ? dir "/" name ".rs" : "")) }' \
           Cargo.toml \
    && cargo build --release --locked ${CARGO_FEATURE_FLAGS} \
    && rm -rf src target/release/.fingerprint/payroc-broker-*

# The crate itself (the stubs of the other targets stay). protox compiles
# proto/ in build.rs: no system protoc. The fingerprints removed above make
# cargo rebuild the crate even though COPY keeps the sources' older mtimes.
COPY src src
RUN cargo build --release --locked ${CARGO_FEATURE_FLAGS} \
    && install -m 0755 target/release/payroc-broker /usr/local/bin/payroc-broker

# --- runtime -------------------------------------------------------------------
# distroless/cc: glibc, libgcc and CA certificates, no shell, no package
# manager. The `nonroot` tag runs as uid/gid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/payroc-broker /usr/local/bin/payroc-broker
USER 65532:65532
EXPOSE 50051 9464
# One grpc.health.v1 Check of the overall status: NOT_SERVING until the first
# Bearer tokens are fetched (warm start) and once shutdown begins. Exec form:
# the image has no shell. Set --addr if the configuration listens elsewhere.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/payroc-broker", "health", "--addr", "127.0.0.1:50051", "--timeout", "3s"]
# SIGTERM (docker stop) turns health NOT_SERVING, drains in-flight RPCs, exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/payroc-broker"]
CMD ["serve", "--config", "/etc/payroc-broker/broker.toml"]
