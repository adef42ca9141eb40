# syntax=docker/dockerfile:1
# The m3o-operator image: static (musl) binaries on distroless, running as non-root:
# m3o-operator (the entrypoint) and m3o-gateway-auth (the chart's optional gateway).
#
#   docker build -t m3o-operator:0.1.0 .
#   docker run --rm m3o-operator:0.1.0 --help
#
# Builds for the architecture of the build platform (amd64 or arm64; use
# `docker buildx build --platform linux/arm64` for another one, under emulation).
# Not built in this repository's CI: no container engine runs there. The Helm chart
# runs it with a read-only root filesystem as UID 65532.

ARG RUST_VERSION=1.95
ARG DEBIAN_CODENAME=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_CODENAME} AS build
# musl-tools: the C compiler for the static target (ring's C/asm parts);
# protobuf-compiler: protoc, needed by etcd-client's and events' build scripts.
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
RUN rustup target add "$(uname -m)-unknown-linux-musl"
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crds crds
COPY controllers controllers
COPY events events
COPY migrations migrations
COPY operator operator
COPY gateway gateway
COPY platform-contract platform-contract
# The caches keep the registry and the target dir across builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    set -eux; \
    target="$(uname -m)-unknown-linux-musl"; \
    export "CC_$(echo "$target" | tr - _)=musl-gcc"; \
    cargo build --release --locked -p m3o-operator --bin m3o-operator -p m3o-gateway --bin m3o-gateway-auth --target "$target"; \
    cp "target/$target/release/m3o-operator" "target/$target/release/m3o-gateway-auth" /; \
    /m3o-operator --version; /m3o-gateway-auth --version

# distroless/static: CA certificates, /etc/passwd with nonroot (65532), no shell.
FROM gcr.io/distroless/static-debian12:nonroot
LABEL org.opencontainers.image.title="m3o-operator" \
      org.opencontainers.image.description="Kubernetes operator for the M3O platform's customer backend" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /m3o-operator /usr/local/bin/m3o-operator
COPY --from=build /m3o-gateway-auth /usr/local/bin/m3o-gateway-auth
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/m3o-operator"]
CMD ["run"]
