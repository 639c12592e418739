//! `clawtermd`: the ClawTerm session server (one per node). The options and their layers
//! (command line, `CLAWTERM_*` environment, `--config` file) are
//! [`clawterm::server::settings`]; running until a signal is [`clawterm::server::daemon`].

mod demo;

use clawterm::server::daemon::{Signals, Stop};
use clawterm::server::settings::{Early, Settings};
use clawterm::server::{self};
use std::process::ExitCode;
use std::time::Duration;
use tracing::{error, info};

/// Logs to stderr, filtered by RUST_LOG (default `info`).
fn init_logging() {
    use tracing_subscriber::prelude::*;
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(filter);
    let registry = tracing_subscriber::registry().with(fmt);
    #[cfg(debug_assertions)]
    if let Some(fault) = fault::PanicOn::from_env() {
        registry.with(fault).init();
        return;
    }
    registry.init();
}

/// Fault injection for tests, compiled into debug builds only (release builds, hence the
/// images, do not have it): with `CLAWTERMD_TEST_PANIC_ON=TEXT` in the environment, a shard
/// thread panics when it logs an event (any level) whose message contains TEXT. This lets a
/// black-box test make a shard panic at a moment it chooses, to check what the daemon does then.
#[cfg(debug_assertions)]
mod fault {
    use tracing::field::{Field, Visit};
    use tracing_subscriber::layer::{Context, Layer};

    pub struct PanicOn(String);

    impl PanicOn {
        pub fn from_env() -> Option<PanicOn> {
            let text = std::env::var("CLAWTERMD_TEST_PANIC_ON").ok()?;
            (!text.is_empty()).then_some(PanicOn(text))
        }
    }

    struct Message(String);

    impl Visit for Message {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            if field.name() == "message" {
                self.0 = format!("{value:?}");
            }
        }
    }

    impl<S: tracing::Subscriber> Layer<S> for PanicOn {
        fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
            let on_shard = std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("shard-"));
            if !on_shard {
                return;
            }
            let mut m = Message(String::new());
            event.record(&mut m);
            if m.0.contains(&self.0) {
                panic!("injected fault (CLAWTERMD_TEST_PANIC_ON): {}", m.0);
            }
        }
    }
}

fn main() -> ExitCode {
    init_logging();
    let loaded = match Settings::from_process() {
        Ok(x) => x,
        Err(Early::Print(e)) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(Early::Refused(msg)) => {
            eprintln!("clawtermd: {msg}");
            return ExitCode::from(2);
        }
    };
    let mut cfg = match loaded.server_config() {
        Ok(c) => c,
        Err(msg) => {
            eprintln!("clawtermd: {msg}");
            return ExitCode::from(2);
        }
    };
    let args = &loaded.settings;
    if args.check_config {
        println!("clawtermd: {}", loaded.summary(&cfg));
        return ExitCode::SUCCESS;
    }
    let sigs = Signals::block();
    if args.cpus.is_some() {
        // Everything started from here on (pod registry, admin, config watcher, the demo
        // agent) stays on the CPUs given, as a cpuset would keep it.
        let mut set: Vec<usize> = cfg.cpus.iter().flatten().copied().collect();
        set.sort_unstable();
        set.dedup();
        if let Err(e) = shards::confine_current_thread(&set) {
            tracing::warn!(cpus = ?set, "could not confine clawtermd to its shard CPUs: {e}");
        }
    }
    let demo = if args.demo {
        match demo::prepare(&mut cfg, !args.insecure_plaintext) {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("clawtermd: --demo: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let server = match server::start(cfg.clone()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("clawtermd: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Reload the tokens file and the TLS certificate when they change on disk (also on SIGHUP).
    server.watch_files();
    let Some(addr) = server.local_addr() else {
        eprintln!("clawtermd: no listening address");
        return ExitCode::FAILURE;
    };
    let quic = match server.quic_addr() {
        Some(q) if server.quic_steered() => format!(" and quic {q} (steered by connection id)"),
        Some(q) => format!(" and quic {q} (forwarded between shards)"),
        None => String::new(),
    };
    let ws = match server.ws_addr() {
        Some(w) => format!(", websocket {w}"),
        None => String::new(),
    };
    info!(
        "clawtermd {} listening on tcp {} ({}){}{}, {} shards, {} I/O, agents in {}",
        env!("CARGO_PKG_VERSION"),
        addr,
        if cfg.tls.is_some() {
            "TLS 1.3"
        } else {
            "plaintext"
        },
        quic,
        ws,
        cfg.shards,
        server.backend(),
        cfg.socket_dir.display()
    );
    if let Some(w) = server.ws_addr() {
        let scheme = if cfg.tls.is_some() { "https" } else { "http" };
        let host = if w.ip().is_unspecified() {
            std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), w.port())
        } else {
            w
        };
        info!("browser terminal on {scheme}://{host}/ (WebSocket endpoint /ws)");
    }
    if let Some(a) = server.admin_addr() {
        info!("admin endpoint on http://{a} (/metrics, /healthz, /readyz)");
    }
    if let Some(d) = &demo {
        d.run_walkthrough(addr, server.quic_addr(), server.ws_addr());
    }
    // A shard that failed takes its sessions with it: exit non-zero so the supervisor restarts
    // the node.
    let stop = server.run_until_signal(&sigs);
    let server_failed = server
        .shared()
        .upgrade_failed
        .load(std::sync::atomic::Ordering::SeqCst);
    let failed = stop == Stop::ShardFailed;
    server.shutdown();
    if stop == Stop::Upgraded {
        let r = server.join();
        if let Err(e) = r {
            error!("after the upgrade hand-over: {e}");
        }
        if server_failed {
            error!("clawtermd stopped: the live upgrade failed part way; start clawtermd on the state dir again to bring its sessions back");
            return ExitCode::FAILURE;
        }
        if args.after_upgrade == server::settings::AfterUpgrade::Wait {
            info!("handed over to the new clawtermd; waiting for SIGTERM (--after-upgrade wait)");
            while !matches!(
                sigs.wait(Duration::from_secs(3600)),
                Some(libc::SIGTERM | libc::SIGINT)
            ) {}
        }
        info!("clawtermd handed over and stopped");
        return ExitCode::SUCCESS;
    }
    match server.join() {
        Ok(()) if !failed => {
            info!("clawtermd stopped");
            ExitCode::SUCCESS
        }
        Ok(()) => {
            error!("clawtermd stopped after a shard failure");
            ExitCode::FAILURE
        }
        Err(e) => {
            error!("clawtermd stopped after a shard failure: {e}");
            ExitCode::FAILURE
        }
    }
}
