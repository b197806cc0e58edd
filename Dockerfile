# syntax=docker/dockerfile:1
# The wasm-pc host image. Guest modules are NOT baked in: they come from the
# modules ConfigMap mounted at /modules (see k8s/), so logic changes need no
# new image.
#
#   docker build -t REGISTRY/wasm-pc:TAG .
#   docker build --target precompiled -t REGISTRY/wasm-pc:TAG-warm .   # optional

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p wasm-pc \
 && install -D -m 0755 target/release/wasm-pc /out/wasm-pc \
 && install -d -m 0755 -o 65532 -g 65532 /out/cache

# Runtime: glibc and libgcc only (the binary links nothing else; SQLite is
# bundled), no shell, non-root.
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

# Optional: precompile known modules into the artifact cache, so a pod's
# first start skips compilation (the cache is keyed by module hash and
# engine, so a different module simply compiles as usual).
FROM build AS warm
COPY target/modules/ /modules/
RUN for world in producer consumer; do \
      /out/wasm-pc check "/modules/$world.wasm" --world "$world" --cache-dir /out/cache; \
    done && chown -R 65532:65532 /out/cache

FROM runtime AS precompiled
COPY --from=warm --chown=65532:65532 /out/cache /cache
