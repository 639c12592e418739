//! An agent whose sessions have real state that moves with them (ClawRoam, POD-LINK.md §7):
//! each session keeps a conversation log. Every line the client sends is numbered and answered
//! `#N: line`; `history` prints the whole log. When the session moves to another node, the log
//! goes with it ([`Agent::export`] / [`Agent::import`]), so `#N` goes on from where it was.
//!
//! ```text
//! cargo run --example journal_agent -- /run/claw/sockets 1 7
//! #                                     DIR               TENANT AGENT
//! ```

use clawterm_agent::{Agent, AgentListener, CloseReason, Export, OpenInfo, Outbox, SessionId};
use std::collections::HashMap;

/// One session's conversation: the lines so far, and a partial line.
#[derive(Default, Debug, PartialEq, Eq)]
struct Journal {
    lines: Vec<String>,
    partial: Vec<u8>,
}

impl Journal {
    /// Feeds client bytes; returns what to answer.
    fn input(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for &b in bytes {
            if b != b'\n' && b != b'\r' {
                self.partial.push(b);
                continue;
            }
            if self.partial.is_empty() {
                continue;
            }
            let line = String::from_utf8_lossy(&std::mem::take(&mut self.partial)).into_owned();
            if line == "history" {
                for (i, l) in self.lines.iter().enumerate() {
                    out.extend_from_slice(format!("  {:>4} {l}\r\n", i + 1).as_bytes());
                }
                out.extend_from_slice(format!("({} lines)\r\n", self.lines.len()).as_bytes());
            } else {
                self.lines.push(line.clone());
                out.extend_from_slice(format!("#{}: {line}\r\n", self.lines.len()).as_bytes());
            }
        }
        out
    }

    /// The state that moves: the lines, newline-separated, then the partial line.
    fn export(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(self.lines.len() as u32).to_be_bytes());
        for l in &self.lines {
            v.extend_from_slice(&(l.len() as u32).to_be_bytes());
            v.extend_from_slice(l.as_bytes());
        }
        v.extend_from_slice(&self.partial);
        v
    }

    /// The journal back from [`Journal::export`]; `None` if the bytes are not one.
    fn import(b: &[u8]) -> Option<Journal> {
        let take4 = |b: &[u8], at: usize| -> Option<usize> {
            Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize)
        };
        let n = take4(b, 0)?;
        let mut at = 4;
        let mut lines = Vec::with_capacity(n.min(1 << 16));
        for _ in 0..n {
            let len = take4(b, at)?;
            at += 4;
            lines.push(String::from_utf8(b.get(at..at + len)?.to_vec()).ok()?);
            at += len;
        }
        Some(Journal {
            lines,
            partial: b.get(at..)?.to_vec(),
        })
    }
}

/// One per pod link: the journals of that link's sessions.
#[derive(Default)]
struct Journals(HashMap<SessionId, Journal>);

impl Agent for Journals {
    fn movable() -> bool {
        true
    }

    fn open(&mut self, s: SessionId, info: &OpenInfo, out: &Outbox) {
        self.0.entry(s).or_default();
        if !info.reopen {
            let _ = out.data(
                s,
                b"journal agent: every line is kept; `history` shows them\r\n",
            );
        }
    }

    fn data(&mut self, s: SessionId, bytes: &[u8], out: &Outbox) {
        let answer = self.0.entry(s).or_default().input(bytes);
        if !answer.is_empty() {
            let _ = out.data(s, &answer);
        }
    }

    fn export(&mut self, s: SessionId) -> Export {
        Export::State(self.0.get(&s).map(Journal::export).unwrap_or_default())
    }

    fn import(&mut self, s: SessionId, state: Vec<u8>, out: &Outbox) {
        match Journal::import(&state) {
            Some(j) => {
                let _ = out.data(
                    s,
                    format!("(journal of {} lines moved here)\r\n", j.lines.len()).as_bytes(),
                );
                self.0.insert(s, j);
            }
            None => {
                let _ = out.data(s, b"(journal state unreadable; starting afresh)\r\n");
            }
        }
    }

    fn close(&mut self, s: SessionId, _reason: CloseReason, _out: &Outbox) {
        self.0.remove(&s);
    }
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_else(|| "/run/claw/sockets".into());
    let tenant: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let agent: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(7);
    let listener = AgentListener::bind(dir.as_ref(), tenant, agent)?;
    println!("journal agent listening on {}", listener.path().display());
    listener.serve(Journals::default, clawterm_agent::stop_on_signals())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_survives_export_and_import() {
        let mut j = Journal::default();
        assert_eq!(j.input(b"one\ntwo\nhalf"), b"#1: one\r\n#2: two\r\n");
        let moved = Journal::import(&j.export()).expect("importable");
        assert_eq!(moved, j);
        let mut moved = moved;
        assert_eq!(moved.input(b" done\n"), b"#3: half done\r\n");
        let h = String::from_utf8(moved.input(b"history\n")).unwrap();
        assert!(
            h.contains("1 one") && h.contains("3 half done") && h.contains("(3 lines)"),
            "{h}"
        );
        assert_eq!(Journal::import(b"\0\0\0\x05"), None);
        assert_eq!(Journal::import(b""), None);
    }
}
