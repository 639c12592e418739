//! `include/clawterm.h` is what cbindgen makes of `src/lib.rs` with `cbindgen.toml`: the
//! committed header is checked against a fresh one (CLAWTERM_UPDATE_HEADER=1 rewrites it).

use std::path::Path;

#[test]
fn header_is_current() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut fresh = Vec::new();
    cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(config)
        .generate()
        .expect("cbindgen")
        .write(&mut fresh);
    let path = dir.join("include/clawterm.h");
    if std::env::var_os("CLAWTERM_UPDATE_HEADER").is_some() {
        std::fs::write(&path, &fresh).expect("write the header");
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "include/clawterm.h is out of date: run CLAWTERM_UPDATE_HEADER=1 cargo test -p clawterm-ffi --test header"
    );
}
