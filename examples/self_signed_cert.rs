//! Writes a throw-away self-signed TLS pair (`tls-cert.pem`, `tls-key.pem`, for `localhost` and
//! 127.0.0.1) into a directory and prints the certificate's SHA-256 (what `clawterm --pin`
//! takes). Used by `scripts/validate-deploy.sh` where `openssl` is not installed; handy for a
//! quick local TLS setup too. Not for production: use a certificate from your CA.
//!
//! `cargo run --example self_signed_cert -- DIR`

fn main() -> std::process::ExitCode {
    let Some(dir) = std::env::args_os().nth(1) else {
        eprintln!("usage: self_signed_cert DIR");
        return std::process::ExitCode::from(2);
    };
    match clawterm::server::tls::self_signed(std::path::Path::new(&dir)) {
        Ok((cert, key, sha256)) => {
            println!("{} {} sha256={sha256}", cert.display(), key.display());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("self_signed_cert: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
