#!/usr/bin/env sh
# Builds the static drainproxy binary the image ships: glibc linked statically (crt-static),
# so it runs on distroless/static or scratch. The Dockerfile runs this script, and so does CI.
# Name resolution: upstream and listen addresses are meant to be numeric (127.0.0.1:8080);
# a static glibc cannot load NSS modules, so host names resolve through /etc/hosts only.
set -eu
target="${TARGET:-x86_64-unknown-linux-gnu}"
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  cargo build --release --locked --target "$target" --bin drainproxy
echo "target/$target/release/drainproxy"
