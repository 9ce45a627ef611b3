# syntax=docker/dockerfile:1
# One image per binary, each with only that binary (Dockerfile targets; the last, eastwest-proxy,
# is the default):
#   docker build --target eastwest-proxy   -t <registry>/eastwest-proxy:0.1.0 .
#   docker build --target eastwest-control -t <registry>/eastwest-control:0.1.0 .
#   docker build --target eastwest-bench   -t <registry>/eastwest-bench:0.1.0 .
#   docker build --target eastwest-certs   -t <registry>/eastwest-certs:0.1.0 .   (optional)
# The build stage is shared, so later builds reuse the first one's compile. Add
# `--build-arg EASTWEST_GIT_COMMIT="$(git rev-parse --short HEAD)"` so --version names the commit.
#
# Base images are build arguments so they can be pinned by digest (docker pulls the digest and
# ignores the tag; the tag stays as a reminder of what it is). Resolve the current digests:
#   docker buildx imagetools inspect docker.io/library/rust:1.95-bookworm --format '{{json .Manifest.Digest}}'
#   docker buildx imagetools inspect gcr.io/distroless/cc-debian12:nonroot --format '{{json .Manifest.Digest}}'
# (or `crane digest <image>`), then either write them into the defaults below as
# `name:tag@sha256:<64 hex>` (deploy/test.sh checks the form), or pass them per build:
#   docker build --build-arg RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot@sha256:... .
# Unpinned, the defaults follow their tags: pin them before building release images.
ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
# .git is not in the build context: --version shows this commit, or "unknown" without it.
ARG EASTWEST_GIT_COMMIT=""
WORKDIR /src
COPY . .
# Stripped for the images (the release profile keeps line tables for local profiling).
ENV CARGO_PROFILE_RELEASE_STRIP=symbols
# Cache mounts keep the registry and target dir between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        --bin eastwest-proxy --bin eastwest-control --bin eastwest-certs --bin eastwest-bench \
 && mkdir -p /out \
 && cp target/release/eastwest-proxy target/release/eastwest-control \
       target/release/eastwest-certs target/release/eastwest-bench /out/

# The runtime stages: glibc + libgcc, no shell, no package manager; UID/GID 65532 (nonroot).

# Route-table server (deploy/control).
FROM ${RUNTIME_IMAGE} AS eastwest-control
COPY --from=build /out/eastwest-control /usr/local/bin/
USER 65532:65532
# Route-table stream (mTLS), admin/metrics.
EXPOSE 15010 15014
ENTRYPOINT ["/usr/local/bin/eastwest-control"]

# Offline CA tool, for operators without a Rust toolchain:
#   docker run --rm -v "$CERTS_DIR:/certs" <registry>/eastwest-certs:0.1.0 mesh --out /certs/...
FROM ${RUNTIME_IMAGE} AS eastwest-certs
COPY --from=build /out/eastwest-certs /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/eastwest-certs"]

# Load generator and OpenAI-compatible stand-in server (deploy/samples/ash).
FROM ${RUNTIME_IMAGE} AS eastwest-bench
COPY --from=build /out/eastwest-bench /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/eastwest-bench"]

# The gateway (deploy/base): eastwest-proxy only. Last stage, so a plain `docker build .` makes it.
FROM ${RUNTIME_IMAGE} AS eastwest-proxy
COPY --from=build /out/eastwest-proxy /usr/local/bin/
USER 65532:65532
# Status, TLS passthrough, istiod xDS/webhook, eastwest-control (fra).
EXPOSE 15021 15443 15012 15017 15010
ENTRYPOINT ["/usr/local/bin/eastwest-proxy"]
CMD ["--config", "/etc/eastwest/proxy/config.yaml"]
