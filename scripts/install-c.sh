#!/usr/bin/env bash
# Builds libclawterm (the C ABI, clients/c) in release and installs the header, the shared and
# static libraries and the pkg-config file under PREFIX (default /usr/local):
#   scripts/install-c.sh [PREFIX]
#   cc prog.c $(pkg-config --cflags --libs clawterm)
# With a PREFIX other than a system one, point PKG_CONFIG_PATH at PREFIX/lib/pkgconfig and the
# loader at PREFIX/lib (LD_LIBRARY_PATH or -Wl,-rpath).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
prefix="${1:-/usr/local}"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)"
echo "install-c: cargo build --release -p clawterm-ffi"
(cd "$root" && cargo build --release --locked -p clawterm-ffi)
target="${CARGO_TARGET_DIR:-$root/target}/release"
install -d "$prefix/include" "$prefix/lib/pkgconfig"
install -m 0644 "$root/clients/c/include/clawterm.h" "$prefix/include/"
# Built as libclawterm_ffi (the server crate is `clawterm`), installed as libclawterm.
install -m 0755 "$target/libclawterm_ffi.so" "$prefix/lib/libclawterm.so"
install -m 0644 "$target/libclawterm_ffi.a" "$prefix/lib/libclawterm.a"
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" "$root/clients/c/clawterm.pc.in" \
  > "$prefix/lib/pkgconfig/clawterm.pc"
echo "install-c: installed clawterm.h, libclawterm.so, libclawterm.a and clawterm.pc under $prefix"
