//! Harness shared by the client tests: server, agent and a TCP proxy the tests can cut.

#![allow(dead_code)]

use std::net::SocketAddr;

// Not every test binary uses every re-export.
#[allow(unused_imports)]
pub use crate::{contains, count, hex, Proc, Proxy, TempDir};
use crate::{plaintext_clawtermd, start_server, tcp_addr};

pub const TENANT: u32 = 7;
pub const AGENT: u32 = 1;
pub const TOKEN: [u8; 32] = [0xAB; 32];

/// Server + one agent. Drop order: server, agents, dir.
#[allow(dead_code)] // held for their Drop
pub struct Env {
    pub server: Proc,
    pub agents: Vec<Proc>,
    pub addr: SocketAddr,
    pub dir: TempDir,
}

impl Env {
    /// `mode`: claw-agent arguments after the ids (e.g. `["echo"]`).
    pub fn start(mode: &[&str]) -> Env {
        let dir = TempDir::with_sock("env");
        let sock = dir.sock();
        let tokens = dir.0.join("tokens");
        std::fs::write(&tokens, format!("{TENANT} {}\n", hex(&TOKEN))).unwrap();
        let agent = start_agent(&sock, AGENT, mode);
        let mut cmd = plaintext_clawtermd(&tokens, &sock);
        cmd.args(["--shards", "2", "--admin", "off", "--no-quic"])
            .env("RUST_LOG", "info");
        let (child, _, line) = start_server(&mut cmd, "clawtermd");
        let server = Proc(child);
        let addr = tcp_addr(&line).expect("clawtermd's TCP address");
        Env {
            server,
            agents: vec![agent],
            addr,
            dir,
        }
    }

    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }
}

/// Starts `claw-agent` for TENANT and waits (bounded) until it is listening.
pub fn start_agent(sock: &std::path::Path, agent: u32, mode: &[&str]) -> Proc {
    crate::start_agent(sock, TENANT, agent, mode)
}
