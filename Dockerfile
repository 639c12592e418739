# syntax=docker/dockerfile:1
#
# clawterm container images.
#
#   docker build -t clawterm:0.1.0 .                              # clawtermd (the default, last stage)
#   docker build --target agent -t clawterm-agent:0.1.0 .         # claw-agent + bash, for the example agent
#
# Optional build args for the OCI labels: VERSION, REVISION (git commit), CREATED (RFC 3339),
# SOURCE (repository URL), e.g. --build-arg REVISION="$(git rev-parse HEAD)".
#
# Stages:
#   builder    rust:1-bookworm; builds clawtermd, claw-agent and clawterm in release.
#   web        node:20-bookworm-slim; builds the browser terminal page (clients/web, npm ci from
#              the lock file, esbuild), served by clawtermd from /usr/share/clawterm/web.
#   agent      debian:bookworm-slim + bash + claw-agent: `shell` mode needs a real shell.
#   clawtermd  gcr.io/distroless/cc-debian12:nonroot (glibc + libgcc, no shell), UID/GID 65532.
#
# The binaries link only against glibc and libgcc_s (checked by scripts/validate-deploy.sh), which
# is exactly what distroless/cc provides, so no musl/static build is needed.
#
# No Docker engine runs in this project's CI: scripts/validate-deploy.sh lints this file with
# hadolint and runs the same `cargo build` command outside Docker. Keep the build command below and
# the one in that script identical (the script checks that they are).

ARG RUST_IMAGE=rust:1-bookworm
ARG AGENT_BASE_IMAGE=debian:bookworm-slim
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot
ARG NODE_IMAGE=node:20-bookworm-slim

# ---------------------------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS builder
WORKDIR /src
ENV CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0

# 1. Dependencies only: the workspace manifests and the lock file, with stub sources for every
#    target the manifests name. This layer (downloaded and compiled crates) is rebuilt only when a
#    Cargo.toml or Cargo.lock changes, not on every source edit.
COPY Cargo.toml Cargo.lock ./
COPY core/Cargo.toml core/Cargo.toml
COPY poll/Cargo.toml poll/Cargo.toml
COPY agent/Cargo.toml agent/Cargo.toml
COPY client/Cargo.toml client/Cargo.toml
COPY clients/c/Cargo.toml clients/c/Cargo.toml
COPY shards/Cargo.toml shards/Cargo.toml
COPY loadgen/Cargo.toml loadgen/Cargo.toml
COPY testkit/Cargo.toml testkit/Cargo.toml
COPY bench/Cargo.toml bench/Cargo.toml
# The test harness (testkit/), measurement (bench/) and C ABI (clients/c/) crates are workspace
# members the image never builds: their stubs stay for the real build too.
RUN mkdir -p src/bin/clawtermd core/src poll/src agent/src client/src clients/c/src shards/src loadgen/src \
             testkit/src bench/src/bin bench/benches \
    && touch src/lib.rs core/src/lib.rs poll/src/lib.rs agent/src/lib.rs client/src/lib.rs shards/src/lib.rs \
             testkit/src/lib.rs clients/c/src/lib.rs \
    && for f in src/bin/clawtermd/main.rs src/bin/claw-agent.rs src/bin/clawterm.rs src/bin/clawtermctl.rs \
                loadgen/src/main.rs \
                bench/src/bin/pod_figures.rs bench/src/bin/tls_figures.rs bench/src/bin/reconnect_figure.rs \
                bench/src/bin/state_figures.rs bench/src/bin/cluster_figures.rs bench/src/bin/ws_figures.rs bench/src/bin/client_echo.rs \
                bench/benches/codec.rs bench/benches/session_memory.rs; do echo 'fn main() {}' > "$f"; done \
    && cargo fetch --locked \
    && cargo build --release --locked -p clawterm --bins \
    && rm -rf src core/src poll/src agent/src client/src shards/src loadgen/src \
              target/release/.fingerprint/claw* target/release/.fingerprint/shards-* \
              target/release/deps/*claw* target/release/deps/*shards*

# 2. The real sources (see .dockerignore for what is left out), then the real build.
COPY core core
COPY poll poll
COPY agent agent
COPY client client
COPY shards shards
COPY loadgen loadgen
COPY src src
RUN cargo build --release --locked -p clawterm --bins \
    && mkdir -p /out \
    && for b in clawtermd claw-agent clawterm clawtermctl; do \
         objcopy --strip-debug "target/release/$b" "/out/$b"; \
       done \
    && /out/clawtermd --version

# ---------------------------------------------------------------------------------------------
# The browser terminal page: npm packages from the registry through the lock file (the package
# layer is rebuilt only when a manifest or lock changes), then the esbuild bundle.
FROM ${NODE_IMAGE} AS web
WORKDIR /web/clients/web
COPY clients/web/package.json clients/web/package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY clients/js/src /web/clients/js/src
COPY clients/web/build.mjs ./
COPY clients/web/src src
RUN npm run build && test -f dist/index.html

# ---------------------------------------------------------------------------------------------
# The example agent pod: claw-agent's `shell` mode runs a login shell per session, so this image
# has bash (Debian slim ships it). Runs as UID/GID 65532 like clawtermd, so the daemon may connect
# to the agent's socket (created with the default umask: owner-writable only).
FROM ${AGENT_BASE_IMAGE} AS agent
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG SOURCE=""
LABEL org.opencontainers.image.title="claw-agent" \
      org.opencontainers.image.description="ClawTerm reference agent pod (echo, shell, exec modes) with bash" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE}"
RUN groupadd --gid 65532 agent \
    && useradd --uid 65532 --gid 65532 --home-dir /home/agent --create-home --shell /bin/bash agent
COPY --from=builder /out/claw-agent /out/clawterm /usr/local/bin/
ENV SHELL=/bin/bash
USER 65532:65532
WORKDIR /home/agent
ENTRYPOINT ["/usr/local/bin/claw-agent"]
CMD ["-s", "/run/claw/sockets", "--tenant", "1", "--agent", "1", "shell"]

# ---------------------------------------------------------------------------------------------
# clawtermd (default target). distroless :nonroot runs as UID/GID 65532 ("nonroot"); the hostPath
# socket directory must be writable/searchable by that UID or GID (docs/DEPLOYMENT.md, "Node
# prerequisites"). No shell in this image: use `clawtermd --check-config` to test a config.
FROM ${RUNTIME_IMAGE} AS clawtermd
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG SOURCE=""
LABEL org.opencontainers.image.title="clawtermd" \
      org.opencontainers.image.description="ClawTerm session server: interactive agent sessions that survive network drops, device switches and reconnects" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE}"
COPY --from=builder /out/clawtermd /out/claw-agent /out/clawterm /out/clawtermctl /usr/local/bin/
COPY --from=web /web/clients/web/dist /usr/share/clawterm/web
USER 65532:65532
# 7220/tcp: ClawTerm clients (TLS); 7221/udp: QUIC; 7222/tcp: WebSocket and the browser
# terminal page; 9720/tcp: admin (/metrics, /healthz, /readyz) when CLAWTERM_ADMIN=0.0.0.0:9720.
EXPOSE 7220/tcp 7221/udp 7222/tcp 9720/tcp
ENTRYPOINT ["/usr/local/bin/clawtermd"]
