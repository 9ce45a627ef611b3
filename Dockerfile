# syntax=docker/dockerfile:1
# One image with every eastwest binary (eastwest-proxy, eastwest-control, eastwest-certs,
# eastwest-bench); the Kubernetes manifests in deploy/ pick one with `command:`.
#   docker build --build-arg EASTWEST_GIT_COMMIT="$(git rev-parse --short HEAD)" \
#     -t <registry>/eastwest:0.1.0 .

FROM docker.io/library/rust:1.95-bookworm AS build
# .git is not in the build context: --version shows this commit, or "unknown" without it
# (docker build --build-arg EASTWEST_GIT_COMMIT=$(git rev-parse --short HEAD) .).
ARG EASTWEST_GIT_COMMIT=""
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target dir between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        --bin eastwest-proxy --bin eastwest-control --bin eastwest-certs --bin eastwest-bench \
 && mkdir -p /out \
 && cp target/release/eastwest-proxy target/release/eastwest-control \
       target/release/eastwest-certs target/release/eastwest-bench /out/

# glibc + libgcc, no shell, no package manager; runs as UID/GID 65532 (nonroot).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ /usr/local/bin/
USER 65532:65532
# Admin/metrics, TLS passthrough, istiod xDS/webhook, eastwest-control.
EXPOSE 15021 15443 15012 15017 15010
ENTRYPOINT ["/usr/local/bin/eastwest-proxy"]
CMD ["--config", "/etc/eastwest/proxy/config.yaml"]
