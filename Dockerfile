# syntax=docker/dockerfile:1
# The wasm-pc host image. Guest modules are NOT baked in: they come from the
# modules ConfigMap mounted at /modules (see k8s/), so logic changes need no
# new image. The last stage is the image `docker build .` produces.
#
#   docker build -t REGISTRY/wasm-pc:TAG .
#
# No pre-compiled variant: in Kubernetes /cache is an emptyDir, which hides
# anything baked into the image there, and a cache baked in would tie the
# image to one version of the modules. A pod compiles each module once at
# start (about a quarter of a second) and keeps it in /cache across
# container restarts.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# jemalloc fixes its page size at build time, from the build machine's. On
# arm64 it is set to 64 KiB, which also runs on kernels with 4 or 16 KiB
# pages (a smaller size than the kernel's would not start).
ARG TARGETARCH
RUN if [ "$TARGETARCH" = "arm64" ]; then export JEMALLOC_SYS_WITH_LG_PAGE=16; fi \
 && cargo build --release --locked -p wasm-pc \
 && install -D -m 0755 target/release/wasm-pc /out/wasm-pc \
 && install -d -m 0700 -o 65532 -g 65532 /out/cache

# Runtime: glibc and libgcc only (the binary links nothing else; SQLite and
# jemalloc are built in), no shell, non-root.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=build /out/wasm-pc /usr/local/bin/wasm-pc
COPY --from=build --chown=65532:65532 /out/cache /cache
USER 65532:65532
ENV WASM_PC_MODULES_DIR=/modules \
    WASM_PC_CACHE_DIR=/cache \
    WASM_PC_LOG_FORMAT=json
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/wasm-pc"]
CMD ["serve", "--help"]
