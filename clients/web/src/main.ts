// The clawterm browser terminal: xterm.js on @clawterm/client's Session over WebSocket.
//
// - Credentials come from the form or the URL fragment (#tenant=1&agent=1&token=HEX; the demo
//   prints such a link); the fragment is removed from the address bar once read.
// - The session's credentials, the screen (serialized by xterm's serialize addon) and the SEQ
//   of the last frame it shows are kept for this tab (sessionStorage): a reload resumes the
//   session with exactly what it missed after that frame.
// - While the connection is down a banner says so; the library resumes on its own (backoff)
//   and replays what was missed. `navigator.onLine` and visibility changes nudge it to try now.
// - Flow control: output is handed to xterm with write callbacks; above HIGH bytes written
//   but not yet parsed, new output waits in a queue (nothing is dropped) and frames are
//   acknowledged only once xterm has parsed them, so the server keeps them for replay.
import { Terminal } from "@xterm/xterm";
import { FitAddon } from "@xterm/addon-fit";
import { SerializeAddon } from "@xterm/addon-serialize";
import { Session, type Credentials } from "@clawterm/client";

const HIGH = 512 * 1024;
/** Reconnect delays while the network is down: uniform in [50 ms, min(400 ms, 50 ms·2ⁿ)] —
 * a tab notices the network is back within 0.4 s even when the browser does not say so. */
const BACKOFF = { baseMs: 50, capMs: 400 };
const LOW = 64 * 1024;
const STORE = "clawterm.tab";

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;
const banner = $("banner");
const form = $<HTMLFormElement>("connect");
const endBtn = $<HTMLButtonElement>("end");
const label = $("session");

const term = new Terminal({ scrollback: 10000, cursorBlink: true, allowProposedApi: false });
const fit = new FitAddon();
const serializer = new SerializeAddon();
term.loadAddon(fit);
term.loadAddon(serializer);
term.open($("term"));
fit.fit();

interface Saved {
  creds: Credentials;
  screen: string;
  /** SEQ of the last frame the saved screen shows. */
  shown: number;
}

let session: Session | null = null;
/** Output waiting for xterm (flow control), with the SEQ each chunk ends. */
const queue: { bytes: Uint8Array; seq: number }[] = [];
let pending = 0;
/** SEQ of the last frame xterm has parsed. */
let shown = 0;

function say(text: string, kind: "down" | "ok" | "info" | "" = "info") {
  banner.textContent = text;
  banner.className = kind;
  banner.hidden = text === "";
}

function wsUrl(): string {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/ws`;
}

function pump() {
  while (queue.length > 0 && pending < HIGH) {
    const c = queue.shift()!;
    pending += c.bytes.length;
    term.write(c.bytes, () => {
      pending -= c.bytes.length;
      shown = Math.max(shown, c.seq);
      session?.consumed(c.seq);
      if (pending < LOW) pump();
    });
  }
}

function save() {
  if (!session) return;
  const creds = session.credentials();
  if (!creds) return;
  const s: Saved = { creds, screen: serializer.serialize(), shown };
  try {
    sessionStorage.setItem(STORE, JSON.stringify(s));
  } catch {
    // Storage full or disabled: a reload starts a new session.
  }
}

function attach(s: Session) {
  session = s;
  s.on("data", (bytes: Uint8Array, seq: number) => {
    queue.push({ bytes, seq });
    pump();
  });
  s.on("status", (st: { state: string; reason?: string; attempt?: number }) => {
    switch (st.state) {
      case "connected": {
        say("", "");
        const c = s.credentials();
        if (c) label.textContent = `session ${c.sessionId.toString(16).padStart(8, "0")}`;
        form.hidden = true;
        endBtn.hidden = false;
        save();
        break;
      }
      case "reconnecting":
        say(`connection lost${st.reason ? ` (${st.reason})` : ""}: reconnecting${st.attempt ? ` (attempt ${st.attempt})` : ""}…`, "down");
        break;
      case "connecting":
        say("connecting…");
        break;
      case "closed":
        say(`session ended${st.reason ? `: ${st.reason}` : ""}`, "down");
        sessionStorage.removeItem(STORE);
        session = null;
        form.hidden = false;
        endBtn.hidden = true;
        label.textContent = "";
        break;
    }
  });
  s.on("gap", () => term.write("\r\n\x1b[33m[clawterm: some output was lost while away]\x1b[0m\r\n"));
  s.on("error", (e: Error) => say(`error: ${e.message}`, "down"));
}

function start(tenant: number, agent: number, token: string) {
  say("connecting…");
  const s = Session.connect({
    url: wsUrl(),
    tenant,
    agent,
    token,
    cols: term.cols,
    rows: term.rows,
    manualAck: true,
    backoff: BACKOFF,
  });
  attach(s);
}

function resumeSaved(): boolean {
  const raw = sessionStorage.getItem(STORE);
  if (!raw) return false;
  let saved: Saved;
  try {
    saved = JSON.parse(raw) as Saved;
  } catch {
    return false;
  }
  term.write(saved.screen);
  shown = saved.shown;
  say("resuming…");
  const s = Session.resume(saved.creds, {
    url: wsUrl(),
    lastSeq: saved.shown,
    cols: term.cols,
    rows: term.rows,
    manualAck: true,
    backoff: BACKOFF,
  });
  attach(s);
  return true;
}

term.onData((d) => session?.write(d));
term.onBinary((d) => session?.write(Uint8Array.from(d, (c) => c.charCodeAt(0) & 0xff)));
term.onResize(({ cols, rows }) => session?.resize(cols, rows));
new ResizeObserver(() => fit.fit()).observe($("term"));
window.addEventListener("pagehide", save);
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "hidden") save();
  else session?.reconnectNow();
});
window.addEventListener("online", () => session?.reconnectNow());
setInterval(save, 2000);

form.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const tenant = Number($<HTMLInputElement>("tenant").value);
  const agent = Number($<HTMLInputElement>("agent").value);
  const token = $<HTMLInputElement>("token").value.trim();
  start(tenant, agent, token);
});
endBtn.addEventListener("click", () => {
  session?.close();
});

// Credentials in the fragment (the demo's link): fill the form and connect.
const frag = new URLSearchParams(location.hash.slice(1));
if (!resumeSaved()) {
  if (frag.has("tenant")) $<HTMLInputElement>("tenant").value = frag.get("tenant") ?? "";
  if (frag.has("agent")) $<HTMLInputElement>("agent").value = frag.get("agent") ?? "";
  if (frag.has("token")) $<HTMLInputElement>("token").value = frag.get("token") ?? "";
  if (frag.has("tenant") && frag.has("agent") && frag.has("token")) {
    start(Number(frag.get("tenant")), Number(frag.get("agent")), frag.get("token")!);
  }
}
if (location.hash) history.replaceState(null, "", location.pathname + location.search);
term.focus();
// For the browser tests: what the terminal shows.
(window as unknown as { clawterm: object }).clawterm = {
  term,
  text: () => {
    const b = term.buffer.active;
    const lines: string[] = [];
    for (let i = 0; i < b.length; i++) lines.push(b.getLine(i)?.translateToString(true) ?? "");
    return lines.join("\n");
  },
  session: () => session,
};
