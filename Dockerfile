# syntax=docker/dockerfile:1
#
# taskhost container image: one binary, every role.
#
#   docker build -t taskhost:local .
#   docker run --rm taskhost:local --help
#   docker run --rm -e DATABASE_URL=... -e AMQP_URL=... taskhost:local worker
#
# The default command is `standalone` (api + scheduler + worker in one
# process); docker-compose.yml runs each role as its own service instead.
# Needs BuildKit (the default builder since Docker 23) for the cache mounts.

############################ stage 1: build ##################################
FROM rust:1.95-bookworm AS build

WORKDIR /src

# sqlx: never try to reach a database at compile time.
ENV SQLX_OFFLINE=true \
    CARGO_TERM_COLOR=never

# The whole workspace is needed for cargo to resolve it, even though only the
# `taskhost` binary (crate cli/) is built.
COPY Cargo.toml Cargo.lock ./
COPY common/    common/
COPY api/       api/
COPY worker/    worker/
COPY scheduler/ scheduler/
COPY cli/       cli/
COPY testkit/   testkit/
COPY migrations/ migrations/
# The offline data of the compile-time checked queries (scripts/sqlx-prepare).
COPY .sqlx/ .sqlx/
# The api serves the AsyncAPI document (include_str! in api/src/ops.rs).
COPY docs/asyncapi.json docs/asyncapi.json

# The registry, git checkouts and target dir live in BuildKit cache mounts, so
# a code change recompiles only the workspace crates. A cache mount is not
# part of the image, hence the binary is copied out of it in the same step.
RUN --mount=type=cache,id=taskhost-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=taskhost-cargo-git,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=taskhost-target,target=/src/target,sharing=locked \
    cargo build --release --locked -p taskhost \
 && install -D -m 0755 /src/target/release/taskhost /out/taskhost

############################ stage 2: runtime ################################
FROM debian:bookworm-slim AS runtime

# ca-certificates: TLS to amqps:// / postgres with sslmode;
# curl: container health checks (GET /readyz);
# procps: ps/pgrep/kill for operators and for jobs that need them.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl procps \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 taskhost \
 && useradd --system --uid 10001 --gid taskhost \
        --home-dir /var/lib/taskhost --create-home \
        --shell /usr/sbin/nologin taskhost

COPY --from=build /out/taskhost /usr/local/bin/taskhost

# Inside a container the api must listen on all interfaces to be reachable
# (the built-in default is 127.0.0.1:8080). Override as usual via env.
ENV TASKHOST__API__BIND=0.0.0.0:8080

# Numeric form of user `taskhost`, so runAsNonRoot-style checks can verify it.
USER 10001:10001
WORKDIR /var/lib/taskhost
EXPOSE 8080

# SIGTERM (the default stop signal) makes every role shut down gracefully;
# a worker drains its running jobs first, so give it a long stop timeout.
STOPSIGNAL SIGTERM
ENTRYPOINT ["taskhost"]
CMD ["standalone"]
