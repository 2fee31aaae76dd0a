# drainproxy: a static binary on distroless, running as non-root.
# Build: docker build -t drainproxy .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN ./deploy/build-static.sh && cp target/x86_64-unknown-linux-gnu/release/drainproxy /drainproxy

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /drainproxy /drainproxy
# 65532 is distroless' "nonroot" user; the root filesystem can be mounted read-only.
USER 65532:65532
# 8000: the proxy (the Service targets it); 9901: admin (probes, preStop /drain, /metrics).
EXPOSE 8000 9901
# SIGTERM starts the drain (classic sidecar) or ends the process after release (native).
STOPSIGNAL SIGTERM
# Exec form: drainproxy is PID 1 and receives signals directly.
ENTRYPOINT ["/drainproxy"]
CMD ["run", "--config", "/etc/drainproxy/drainproxy.yaml"]
