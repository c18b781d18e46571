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
# "--no-default-features" leaves the sandbox out of production images;
# "--features otlp" keeps trace export ([telemetry] otlp_endpoint) in.
ARG CARGO_FEATURE_FLAGS="--no-default-features --features otlp"
WORKDIR /src

# Dependencies first, in their own layer: this layer is rebuilt only when a
# manifest, the lock file or the proto change, not on every source edit. Stub
# sources stand in for the crates. Cargo loads the whole workspace, so every
# member's manifest is copied (a member missing here fails the build; .ci/run
# replays this layer) and each member gets an empty `src/lib.rs`; the root
# gets a `src/main.rs`. Every [[bin]], [[bench]], [[example]] and [[test]]
# that a manifest declares needs a file (Cargo refuses the manifest
# otherwise), so each gets an empty stub at its `path` or default place; the
# members and target names come from the manifests so that a new target does
# not break the image. Only payroc-broker and what it depends on are
# compiled here.
COPY Cargo.toml Cargo.lock build.rs ./
COPY clock/Cargo.toml clock/
COPY payroc-sim/Cargo.toml payroc-sim/
COPY broker-bench/Cargo.toml broker-bench/
COPY proto proto
COPY third_party third_party
RUN for member in . $(sed -n '/^members = \[/ { s/^members = \[\(.*\)\]$/\1/; s/[",]/ /g; p; }' Cargo.toml); do \
        mkdir -p "$member/src" && touch "$member/src/lib.rs" \
        && awk -v root="$member/" \
           'function stub(file) { if (file != "") { file = root file; d = file; sub(/\/[^\/]*$/, "", d); \
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
           "$member/Cargo.toml" || exit 1; \
    done \
    && echo 'fn main() {}' > src/main.rs \
    && cargo build --release --locked -p payroc-broker ${CARGO_FEATURE_FLAGS} \
    && rm -rf src clock/src payroc-sim/src \
              target/release/.fingerprint/payroc-broker-* target/release/.fingerprint/broker-clock-* \
              target/release/.fingerprint/payroc-sim-*

# The crates themselves (the stubs of the other targets and members stay).
# protox compiles proto/ in build.rs: no system protoc. The fingerprints
# removed above make cargo rebuild these crates even though COPY keeps the
# sources' older mtimes.
COPY src src
COPY clock/src clock/src
# The simulator: compiled only into a demo image (default features).
COPY payroc-sim/src payroc-sim/src
RUN cargo build --release --locked -p payroc-broker ${CARGO_FEATURE_FLAGS} \
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
