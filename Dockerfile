# syntax=docker/dockerfile:1
# The m3o-operator image for BuildKit users: the same image `make image` builds here
# without a daemon (README, "Install on a cluster"): glibc binaries on a distroless-like root
# filesystem staged by hack/image/rootfs.sh from Debian bookworm packages (the C runtime,
# CA certificates, nonroot 65532), no shell, no package manager, user 65532:65532.
# m3o-operator is the entrypoint; the chart runs m3o-gateway-auth from the same image.
#
#   docker build --build-arg REVISION="$(git rev-parse HEAD)" -t m3o-operator:0.1.0 .
#   docker run --rm m3o-operator:0.1.0 --help
#
# Builds for the architecture of the build platform. Every input of the build is
# copied below; hack/image/check-dockerfile.sh (run by `make test`) fails when a
# workspace member or another input is missing, and when the USER, ENTRYPOINT, CMD,
# EXPOSE or ENV lines disagree with hack/image/image.env (what `make image` uses).
# The bytes differ from `make image` (another toolchain image, BuildKit's tar and gzip).

ARG RUST_VERSION=1.95
ARG DEBIAN_CODENAME=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_CODENAME} AS build
# protoc and its well-known imports: etcd-client's and events' build scripts.
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crds crds
COPY controllers controllers
COPY events events
COPY migrations migrations
COPY connect connect
COPY operator operator
COPY gateway gateway
COPY platform-contract platform-contract
COPY hack/image hack/image
# The caches keep the registry and the target dir across builds (BuildKit); the root
# filesystem is staged outside the cached target dir so that it stays in the stage.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    set -eux; \
    cargo build --release --locked -p m3o-operator --bin m3o-operator -p m3o-gateway --bin m3o-gateway-auth; \
    target/release/m3o-operator --version; target/release/m3o-gateway-auth --version; \
    hack/image/rootfs.sh --bin-dir target/release /rootfs; \
    chown 65532:65532 /rootfs/base/home/nonroot

FROM scratch
ARG VERSION=0.1.0
ARG REVISION=unknown
COPY --from=build /rootfs/base/ /
COPY --from=build /rootfs/app/ /
LABEL org.opencontainers.image.title="m3o-operator" \
      org.opencontainers.image.description="Kubernetes operator for the M3O platform's customer backend, and its gateway forward-auth service" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/m3o/m3o-operator"
ENV PATH=/usr/local/bin:/usr/bin:/bin SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
USER 65532:65532
EXPOSE 8080/tcp 8081/tcp
ENTRYPOINT ["/usr/local/bin/m3o-operator"]
CMD ["run"]
