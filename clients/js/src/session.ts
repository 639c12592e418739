/**
 * A session that survives its connections: it connects (CONNECT), and after any loss
 * reconnects with backoff and full jitter and resumes (RESUME) with exact replay — every
 * output byte is delivered once, in order, and the input the server had not acknowledged is
 * sent again. Works in the browser and in Node: the transport is a {@link Connector}
 * (`webSocketConnector`, or `tcpConnector` in Node); a `ws://` or `wss://` URL picks the
 * WebSocket one with the platform's `WebSocket`.
 */
import { ClientCore, ProtocolError, ServerError, type CoreEvent } from "./core.js";
import { ErrorCode } from "./payload.js";
import type { Conn, ConnHandlers, Connector } from "./transport.js";
import { webSocketConnector } from "./websocket.js";

/** What a tab or a process keeps to resume the session later (JSON-serialisable). */
export interface Credentials {
  endpoint: string;
  /**
   * The host TLS certificates are checked against, where it differs from the endpoint's (the
   * session roamed to another node's address).
   */
  serverName?: string;
  tenant: number;
  agent: number;
  sessionId: number;
  /** Hex of the 16-byte resume token. */
  resumeToken: string;
  /** Highest output SEQ the client has (RESUME's last_seq). */
  lastSeq: number;
  /** The SEQ to continue from. */
  nextSeq: number;
}

export type SessionState = "connecting" | "connected" | "reconnecting" | "closed";

export interface Status {
  state: SessionState;
  /** Why (a loss, an error, the end). */
  reason?: string;
  /** Reconnect attempt number (reconnecting). */
  attempt?: number;
}

export interface SessionOptions {
  /** `ws://HOST:PORT/ws`, `wss://…`, or `HOST:PORT` with a TCP `connector`. */
  url: string;
  /** How to connect (default: WebSocket with the platform's class). */
  connector?: Connector;
  /** Initial terminal size, sent once attached. */
  cols?: number;
  rows?: number;
  /** Acknowledge output only up to what {@link Session.consumed} says was shown. */
  manualAck?: boolean;
  /** Follow ROAM to another node (TCP only; default: true for TCP, false for WebSocket). */
  followRoam?: boolean;
  /** Reconnect delays: the n-th is uniform in [baseMs, min(capMs, baseMs·2ⁿ)] (100 ms, 3 s). */
  backoff?: { baseMs?: number; capMs?: number };
  /** A connection not up within this long is abandoned and tried again (default 10 s). */
  connectTimeoutMs?: number;
  keepaliveMs?: number;
  deadAfterMs?: number;
  /** The name TLS certificates are checked against (default: the host of `url`). */
  serverName?: string;
}

export interface ConnectOptions extends SessionOptions {
  tenant: number;
  agent: number;
  /** The tenant token: 64 hex digits or 32 bytes. */
  token: string | Uint8Array;
}

export interface ResumeOptions extends Omit<SessionOptions, "url"> {
  /** Where to resume (default: the credentials' endpoint). */
  url?: string;
  /** Resume as if output through this SEQ was received (default: the credentials'). */
  lastSeq?: number;
}

type Events = {
  data: (bytes: Uint8Array, seq: number) => void;
  status: (s: Status) => void;
  gap: () => void;
  roam: (endpoint: string) => void;
  takeover: () => void;
  error: (e: Error) => void;
  close: (reason: string) => void;
};

export function hexToBytes(hex: string, len: number): Uint8Array {
  if (!new RegExp(`^[0-9a-fA-F]{${2 * len}}$`).test(hex)) {
    throw new Error(`expected ${2 * len} hex digits`);
  }
  const out = new Uint8Array(len);
  for (let i = 0; i < len; i++) out[i] = parseInt(hex.slice(2 * i, 2 * i + 2), 16);
  return out;
}

export function bytesToHex(b: Uint8Array): string {
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

/** The host of `HOST:PORT`, `[V6]:PORT` or a URL. */
export function hostOf(endpoint: string): string {
  const url = /^[a-z][a-z0-9+.-]*:\/\/(\[[^\]]*\]|[^/:?#]*)/i.exec(endpoint);
  const hp = url ? url[1] : endpoint.replace(/:\d+$/, "");
  return hp.startsWith("[") && hp.endsWith("]") ? hp.slice(1, -1) : hp;
}

const now = () => (typeof performance !== "undefined" ? performance.now() : Date.now());

function randomBytes(n: number): Uint8Array {
  const b = new Uint8Array(n);
  globalThis.crypto.getRandomValues(b);
  return b;
}

export class Session {
  private core: ClientCore;
  private conn: Conn | null = null;
  private endpoint: string;
  /** The host first connected to (TLS names are checked against it after a ROAM). */
  private readonly serverName: string;
  private readonly connector: Connector;
  private readonly opts: SessionOptions;
  private listeners: Partial<Record<keyof Events, unknown[]>> = {};
  private state: SessionState = "connecting";
  private attempt = 0;
  private retryTimer: ReturnType<typeof setTimeout> | undefined;
  private tickTimer: ReturnType<typeof setInterval> | undefined;
  private connectTimer: ReturnType<typeof setTimeout> | undefined;
  private detached = false;
  private readonly encoder = new TextEncoder();
  private counters = { bytesIn: 0, bytesOut: 0, reconnects: 0 };

  private constructor(core: ClientCore, opts: SessionOptions) {
    this.core = core;
    this.opts = opts;
    this.endpoint = opts.url;
    this.serverName = opts.serverName ?? hostOf(opts.url);
    this.connector = opts.connector ?? webSocketConnector();
    if (opts.cols && opts.rows) core.resize(opts.cols, opts.rows, now());
    this.tickTimer = setInterval(() => this.tick(), 1000);
    // Node: the session's timers alone do not keep the process alive.
    (this.tickTimer as { unref?: () => void }).unref?.();
  }

  private static coreOpts(o: SessionOptions) {
    const ws = /^wss?:/.test(o.url);
    return {
      acks: o.manualAck ? ("manual" as const) : ("perRead" as const),
      offerRoam: o.followRoam ?? !ws,
      keepaliveMs: o.keepaliveMs,
      deadAfterMs: o.deadAfterMs,
    };
  }

  /** A new session (CONNECT); it connects at once. */
  static connect(o: ConnectOptions): Session {
    const token = typeof o.token === "string" ? hexToBytes(o.token.trim(), 32) : o.token;
    const s = new Session(new ClientCore(o.tenant, o.agent, token, Session.coreOpts(o)), o);
    queueMicrotask(() => s.open());
    return s;
  }

  /** An existing session (RESUME) from its {@link Credentials}; it connects at once. */
  static resume(c: Credentials, o: ResumeOptions = {}): Session {
    const core = ClientCore.forResume(
      c.tenant,
      c.agent,
      c.sessionId,
      hexToBytes(c.resumeToken, 16),
      o.lastSeq ?? c.lastSeq,
      c.nextSeq,
      Session.coreOpts({ ...o, url: o.url ?? c.endpoint }),
    );
    const s = new Session(core, { ...o, url: o.url ?? c.endpoint, serverName: o.serverName ?? (o.url ? undefined : c.serverName) });
    queueMicrotask(() => s.open());
    return s;
  }

  on<K extends keyof Events>(ev: K, fn: Events[K]): this {
    const list: unknown[] = this.listeners[ev] ?? [];
    list.push(fn);
    this.listeners[ev] = list;
    return this;
  }

  off<K extends keyof Events>(ev: K, fn: Events[K]): this {
    this.listeners[ev] = (this.listeners[ev] ?? []).filter((f) => f !== fn);
    return this;
  }

  private fire<K extends keyof Events>(ev: K, ...args: Parameters<Events[K]>) {
    for (const f of this.listeners[ev] ?? []) {
      try {
        (f as (...a: unknown[]) => void)(...args);
      } catch (e) {
        if (ev !== "error") this.fire("error", e instanceof Error ? e : new Error(String(e)));
      }
    }
  }

  private setState(state: SessionState, extra: Omit<Status, "state"> = {}) {
    this.state = state;
    this.fire("status", { state, ...extra });
  }

  /** The session's state. */
  get status(): SessionState {
    return this.state;
  }

  /** Credentials to resume this session elsewhere or later (null before ACCEPT). */
  credentials(): Credentials | null {
    if (!this.core.hasSession) return null;
    return {
      endpoint: this.endpoint,
      ...(this.serverName !== hostOf(this.endpoint) ? { serverName: this.serverName } : {}),
      tenant: this.core.tenant,
      agent: this.core.agent,
      sessionId: this.core.sessionId,
      resumeToken: bytesToHex(this.core.resumeToken),
      lastSeq: this.core.lastSeq,
      nextSeq: this.core.seqNext,
    };
  }

  /** Bytes in and out on the wire, and reconnects so far. */
  stats() {
    return { ...this.counters };
  }

  /** Input for the agent (kept and resent until the server acknowledges it). */
  write(data: string | Uint8Array) {
    const b = typeof data === "string" ? this.encoder.encode(data) : data;
    this.core.sendData(b, now());
    this.flush();
  }

  resize(cols: number, rows: number) {
    this.core.resize(cols, rows, now());
    this.flush();
  }

  /** With `manualAck`: output through `seq` has been shown; the server may forget it. */
  consumed(seq: number) {
    this.core.consumed(seq, now());
    this.flush();
  }

  /** While reconnecting: try now instead of waiting for the backoff (the network is back). */
  reconnectNow() {
    if (this.state !== "reconnecting" || this.conn !== null) return;
    clearTimeout(this.retryTimer);
    this.open();
  }

  /** Drops the connection abruptly, as a network would (the session resumes by itself). */
  drop() {
    this.conn?.close();
  }

  /** Leaves the session running on the server (SUSPEND) without reconnecting. */
  detach() {
    const goodbye = this.core.attached;
    this.core.suspend(now());
    this.flush();
    this.detached = true;
    this.shutdown("detached", goodbye);
  }

  /** Ends the session (DISCONNECT). */
  close() {
    const goodbye = this.core.attached;
    this.core.disconnect(now());
    this.flush();
    this.shutdown("closed by the client", goodbye);
  }

  /** `goodbye`: what was queued (SUSPEND, DISCONNECT) is sent before the connection closes. */
  private shutdown(reason: string, goodbye = false) {
    clearTimeout(this.retryTimer);
    clearTimeout(this.connectTimer);
    clearInterval(this.tickTimer);
    const c = this.conn;
    this.conn = null;
    if (c) {
      if (goodbye && c.end) c.end();
      else c.close();
    }
    if (this.state !== "closed") {
      this.setState("closed", { reason });
      this.fire("close", reason);
    }
  }

  private flush() {
    if (!this.conn || !this.core.hasOutput()) return;
    const out = this.core.takeOutput();
    this.counters.bytesOut += out.length;
    this.conn.send(out);
  }

  private open() {
    if (this.state === "closed" || this.conn) return;
    let conn: Conn | null = null;
    const mine = () => this.conn === conn && conn !== null;
    this.connectTimer = setTimeout(() => {
      if (mine() && !this.core.attached) conn?.close();
    }, this.opts.connectTimeoutMs ?? 10_000);
    (this.connectTimer as { unref?: () => void }).unref?.();
    const handlers: ConnHandlers = {
      open: () => {
        if (!mine()) return;
        if (this.core.hasSession) this.core.startResume(now());
        else this.core.startConnect(randomBytes(16), now());
        this.flush();
      },
      data: (bytes) => {
        if (!mine()) return;
        this.counters.bytesIn += bytes.length;
        try {
          this.core.onBytes(bytes, now());
        } catch (e) {
          this.fire("error", e instanceof ProtocolError ? e : new ProtocolError(String(e)));
          this.events();
          this.lost(conn!, (e as Error).message);
          return;
        }
        this.events();
        this.flush();
      },
      closed: (reason) => {
        if (mine()) this.lost(conn!, reason);
      },
    };
    try {
      conn = this.connector(this.endpoint, handlers, this.serverName);
    } catch (e) {
      // A setting, not the network (no WebSocket class, a malformed endpoint): no retry.
      const err = e instanceof Error ? e : new Error(String(e));
      this.fire("error", err);
      this.shutdown(`cannot connect: ${err.message}`);
      return;
    }
    this.conn = conn;
  }

  /** The core's events, acted on. */
  private events() {
    let ev: CoreEvent | undefined;
    while ((ev = this.core.pollEvent())) {
      switch (ev.kind) {
        case "accepted":
        case "resumed":
          clearTimeout(this.connectTimer);
          if (this.state !== "connected") this.attempt = 0;
          this.setState("connected");
          if (ev.kind === "resumed" && ev.gap) this.fire("gap");
          break;
        case "data":
          this.fire("data", ev.bytes, ev.seq);
          break;
        case "gap":
          break;
        case "ended":
          this.shutdown("the session ended");
          return;
        case "roam": {
          const host = ev.address.includes(":") ? `[${ev.address}]` : ev.address;
          this.endpoint = `${host}:${ev.port}`;
          this.fire("roam", this.endpoint);
          // Not a failure: resume there at once (as the Rust client does), no backoff.
          const c = this.conn;
          this.conn = null;
          clearTimeout(this.connectTimer);
          c?.close();
          this.core.connectionLost();
          if (this.state === "closed") return;
          this.attempt = 0;
          this.setState("reconnecting", { reason: `the session moved to ${this.endpoint}`, attempt: 0 });
          clearTimeout(this.retryTimer);
          this.retryTimer = setTimeout(() => this.open(), 0);
          return;
        }
        case "error":
          if (ev.code === ErrorCode.TAKEN_OVER) {
            this.fire("takeover");
            this.shutdown("taken over by another connection");
            return;
          }
          if (ev.fatal) {
            const err = new ServerError(ev.code, ev.message, true);
            this.fire("error", err);
            this.shutdown(`refused: ${err.message}`);
            return;
          }
          this.fire("error", new ServerError(ev.code, ev.message, false));
          break;
      }
    }
  }

  private lost(conn: Conn, reason: string) {
    if (this.conn !== conn) return;
    this.conn = null;
    clearTimeout(this.connectTimer);
    conn.close();
    this.core.connectionLost();
    if (this.state === "closed" || this.detached || this.core.closed) return;
    this.attempt += 1;
    this.counters.reconnects += 1;
    const base = this.opts.backoff?.baseMs ?? 100;
    const cap = this.opts.backoff?.capMs ?? 3000;
    const hi = Math.min(cap, base * 2 ** Math.min(this.attempt - 1, 20));
    const delay = base + Math.random() * Math.max(0, hi - base);
    this.setState(this.core.hasSession ? "reconnecting" : "connecting", { reason, attempt: this.attempt });
    this.retryTimer = setTimeout(() => this.open(), delay);
  }

  private tick() {
    if (!this.conn) return;
    if (!this.core.tick(now())) {
      this.lost(this.conn, "nothing received in time (dead connection)");
      return;
    }
    this.flush();
  }
}
