# syntax=docker/dockerfile:1
# Warren's two container images, from one build of the workspace (BuildKit is needed: Docker 23+,
# or `docker buildx build`):
#
#   docker build --target broker   -t warren-broker:dev   .
#   docker build --target operator -t warren-operator:dev .
#
# The second build reuses the first's compilation. tests/k8s-e2e.sh builds both and runs them in
# a kind or k3d cluster.

# ---------------------------------------------------------------- build
FROM rust:1-bookworm AS builder
WORKDIR /src
# The whole workspace (.dockerignore leaves out target/ and .git): cargo needs every member's
# manifest even when it builds two packages.
COPY . .
# The registry and target/ are cache mounts, kept between builds but not in the image, so the
# binaries are copied out of target/ in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p warren-broker -p warren-operator \
 && mkdir -p /out/bin /out/data/warren \
 && cp target/release/warren-broker target/release/warren-operator /out/bin/

# ---------------------------------------------------------------- operator
# `warren-operator run [--leader-elect]`, as the chart's Deployment runs it (its pod runs as the
# distroless `nonroot` user, 65532, with a read-only root filesystem).
FROM gcr.io/distroless/cc-debian12:nonroot AS operator
COPY --from=builder /out/bin/warren-operator /usr/local/bin/warren-operator
USER 65532:65532
# /metrics, /healthz and /readyz (--metrics-listen).
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/warren-operator"]
CMD ["--help"]

# ---------------------------------------------------------------- broker
# The operator's StatefulSet runs it as uid/gid 1000 (fsGroup 1000 on the data volume, mounted
# at /var/lib/warren) with `--config /etc/warren/warren.toml` as its arguments. Run alone, its
# default data directory ./warren-data lands in /var/lib/warren, which uid 1000 owns.
FROM gcr.io/distroless/cc-debian12:nonroot AS broker
COPY --from=builder /out/bin/warren-broker /usr/local/bin/warren-broker
COPY --from=builder --chown=1000:1000 /out/data/ /var/lib/
WORKDIR /var/lib/warren
USER 1000:1000
# AMQP, management API, Prometheus metrics (and the probes' /health/live, /health/ready).
EXPOSE 5672 15672 15692
ENTRYPOINT ["/usr/local/bin/warren-broker"]
