/**
 * The sans-IO client protocol core, as the Rust client library's (`client/src/core.rs`):
 * handshake, RELIABLE resend, replay de-duplication, coalesced cumulative ACKs and
 * keepalives. No sockets, no clock: the driver feeds received bytes with the time (ms on any
 * monotonic scale) and writes out what {@link ClientCore.takeOutput} returns.
 *
 * One core lives for the whole session, across any number of connections: call
 * {@link ClientCore.startConnect} on the first connection, {@link ClientCore.startResume} on
 * every later one, and {@link ClientCore.connectionLost} when one goes away.
 */
import { encode, FLAG_GAP, FrameType, typeName } from "./frame.js";
import {
  CAP_RELIABLE,
  CAP_ROAM,
  CAP_V1,
  encodeAck,
  encodeConnect,
  encodeResize,
  encodeResume,
  ErrorCode,
  parseAccept,
  parseAck,
  parseError,
  parseResumed,
  parseRoam,
  type Resumed,
} from "./payload.js";
import { FrameReader } from "./reader.js";

/** Largest DATA payload the client sends (the server's minimum `--max-payload` is 1024). */
export const MAX_SEND_CHUNK = 1024;

/** What the core reports to its driver. */
export type CoreEvent =
  | { kind: "accepted"; sessionId: number }
  | { kind: "resumed"; gap: boolean; resent: number }
  /** New output (never a byte delivered before); `seq` is its frame's SEQ. */
  | { kind: "data"; bytes: Uint8Array; seq: number }
  | { kind: "gap" }
  /** The server ended the session (DISCONNECT, or AGENT_GONE). */
  | { kind: "ended" }
  /** An ERROR from the server: the connection is over; `fatal`: so is the session. */
  | { kind: "error"; code: number; message: string; fatal: boolean }
  /** The session moved to another node: reconnect there and resume. */
  | { kind: "roam"; address: string; port: number };

/** The server's byte stream broke a rule: the connection is unusable. */
export class ProtocolError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ProtocolError";
  }
}

/** The name of an ERROR code (§6), or `ERROR_<code>` for a code this version does not know. */
export function errorName(code: number): string {
  for (const [k, v] of Object.entries(ErrorCode)) if (v === code) return k;
  return `ERROR_${code}`;
}

/**
 * An ERROR frame from the server (PROTOCOL.md §6): `code` (see {@link ErrorCode}), its name,
 * the server's message, and whether it ended the session for this client (`fatal`: a refused
 * token, an unknown or expired session, a take-over, …) or only the connection.
 */
export class ServerError extends Error {
  readonly codeName: string;
  constructor(
    readonly code: number,
    readonly serverMessage: string,
    readonly fatal: boolean,
  ) {
    super(`${errorName(code)} (${code})${serverMessage ? `: ${serverMessage}` : ""}`);
    this.name = "ServerError";
    this.codeName = errorName(code);
  }
}

export interface CoreOptions {
  /**
   * `perRead` (default): one cumulative ACK for the newest DATA after each `onBytes`.
   * `manual`: only up to what the driver says it has consumed ({@link ClientCore.consumed}):
   * output not yet shown stays in the server's replay ring (the browser page acknowledges
   * what xterm.js has rendered).
   */
  acks?: "perRead" | "manual";
  /** Offer RELIABLE (default true). */
  offerReliable?: boolean;
  /** Offer ROAM (default true). */
  offerRoam?: boolean;
  /** KEEPALIVE after this long without sending (ms, default 15 s). */
  keepaliveMs?: number;
  /** The connection is dead after this long without receiving (ms, default 75 s). */
  deadAfterMs?: number;
}

type Phase = "down" | "connecting" | "resuming" | "attached" | "closed";

/** SEQ comparison with wrap-around (§3). */
export function seqGt(a: number, b: number): boolean {
  return ((a - b) | 0) > 0;
}

const FATAL = new Set<number>([
  ErrorCode.AUTH_FAILED,
  ErrorCode.NO_SUCH_SESSION,
  ErrorCode.TAKEN_OVER,
  ErrorCode.UNSUPPORTED_VERSION,
  ErrorCode.BAD_CONNECT,
]);

export class ClientCore {
  private phase: Phase = "down";
  sessionId = 0;
  resumeToken: Uint8Array = new Uint8Array(16);
  private nextSeq = 1;
  /** Highest server DATA SEQ delivered (undefined: none yet). */
  private highest: number | undefined;
  /** Highest SEQ acknowledged to the server. */
  private acked: number | undefined;
  /** Manual ACKs: highest SEQ the driver has consumed. */
  private consumedUpTo: number | undefined;
  private unacked: { seq: number; bytes: Uint8Array }[] = [];
  private unackedBytes = 0;
  private reliable = true;
  private reader = new FrameReader();
  private out: Uint8Array[] = [];
  private events: CoreEvent[] = [];
  private lastTx = 0;
  private lastRx = 0;
  private pendingResize: [number, number] | undefined;
  private readonly opts: Required<CoreOptions>;
  /** The last RESUMED. */
  lastResumed: Resumed | undefined;

  constructor(
    readonly tenant: number,
    readonly agent: number,
    private readonly token: Uint8Array,
    opts: CoreOptions = {},
  ) {
    this.opts = {
      acks: opts.acks ?? "perRead",
      offerReliable: opts.offerReliable ?? true,
      offerRoam: opts.offerRoam ?? true,
      keepaliveMs: opts.keepaliveMs ?? 15_000,
      deadAfterMs: opts.deadAfterMs ?? 75_000,
    };
    if (!this.opts.offerReliable) this.reliable = false;
  }

  /** A core for an existing session. `lastSeq`: highest server DATA SEQ the client has. */
  static forResume(
    tenant: number,
    agent: number,
    sessionId: number,
    resumeToken: Uint8Array,
    lastSeq: number,
    nextSeq: number,
    opts: CoreOptions = {},
  ): ClientCore {
    const c = new ClientCore(tenant, agent, new Uint8Array(32), opts);
    c.sessionId = sessionId;
    c.resumeToken = resumeToken.slice();
    c.highest = lastSeq !== 0 ? lastSeq : undefined;
    c.acked = c.highest;
    c.consumedUpTo = c.highest;
    c.nextSeq = Math.max(1, nextSeq >>> 0);
    return c;
  }

  get attached(): boolean {
    return this.phase === "attached";
  }
  get closed(): boolean {
    return this.phase === "closed";
  }
  get handshaking(): boolean {
    return this.phase === "connecting" || this.phase === "resuming";
  }
  /** Whether the session exists on the server (ACCEPT was received). */
  get hasSession(): boolean {
    return this.sessionId !== 0;
  }
  /** Highest server DATA SEQ received (0: none): RESUME's `last_seq`. */
  get lastSeq(): number {
    return this.highest ?? 0;
  }
  get seqNext(): number {
    return this.nextSeq;
  }
  get unackedFrames(): number {
    return this.unacked.length;
  }
  get unackedByteCount(): number {
    return this.unackedBytes;
  }

  private takeSeq(): number {
    const s = this.nextSeq;
    this.nextSeq = (this.nextSeq + 1) >>> 0;
    if (this.nextSeq === 0) this.nextSeq = 1;
    return s;
  }

  private emit(type: number, payload: Uint8Array, now: number) {
    this.out.push(encode({ sessionId: this.sessionId, seq: this.takeSeq(), type, flags: 0, payload }));
    this.lastTx = now;
  }

  /** A new connection is up: queue CONNECT. */
  startConnect(nonce: Uint8Array, now: number) {
    this.reader = new FrameReader();
    this.out = [];
    const caps = CAP_V1 | (this.opts.offerReliable ? CAP_RELIABLE : 0) | (this.opts.offerRoam ? CAP_ROAM : 0);
    const p = encodeConnect({ version: 1, caps, tenantId: this.tenant, agentId: this.agent, token: this.token, nonce });
    this.sessionId = 0;
    this.emit(FrameType.CONNECT, p, now);
    this.phase = "connecting";
    this.lastRx = now;
  }

  /** A new connection is up: queue RESUME (24-byte form). */
  startResume(now: number) {
    this.reader = new FrameReader();
    this.out = [];
    const p = encodeResume({ sessionId: this.sessionId, lastSeq: this.lastSeq, token: this.resumeToken });
    this.emit(FrameType.RESUME, p, now);
    this.phase = "resuming";
    this.lastRx = now;
  }

  /** The connection went away. Unsent output is dropped; client DATA stays for resend. */
  connectionLost() {
    this.reader = new FrameReader();
    this.out = [];
    if (this.phase !== "closed") this.phase = "down";
  }

  /** Queues DATA (in chunks); sent now if attached, else after the next ACCEPT/RESUMED. */
  sendData(bytes: Uint8Array, now: number) {
    if (this.phase === "closed") return;
    for (let at = 0; at < bytes.length; at += MAX_SEND_CHUNK) {
      const chunk = bytes.slice(at, at + MAX_SEND_CHUNK);
      const s = this.takeSeq();
      if (this.phase === "attached") {
        this.out.push(encode({ sessionId: this.sessionId, seq: s, type: FrameType.DATA, flags: 0, payload: chunk }));
        this.lastTx = now;
        if (!this.reliable) continue;
      }
      this.unacked.push({ seq: s, bytes: chunk });
      this.unackedBytes += chunk.length;
    }
  }

  /** Queues RESIZE (sent on attach if down). */
  resize(cols: number, rows: number, now: number) {
    if (this.phase === "attached") this.emit(FrameType.RESIZE, encodeResize(cols, rows), now);
    else this.pendingResize = [cols, rows];
  }

  /** Queues SUSPEND: detach on purpose, the session stays. */
  suspend(now: number) {
    if (this.phase === "attached") this.emit(FrameType.SUSPEND, new Uint8Array(0), now);
  }

  /** Queues DISCONNECT: ends the session. */
  disconnect(now: number) {
    if (this.phase === "attached") this.emit(FrameType.DISCONNECT, new Uint8Array(0), now);
    this.phase = "closed";
  }

  /** Bytes to write (drains the buffer); empty when nothing is queued. */
  takeOutput(): Uint8Array {
    if (this.out.length === 0) return new Uint8Array(0);
    if (this.out.length === 1) return this.out.pop()!;
    const n = this.out.reduce((a, b) => a + b.length, 0);
    const all = new Uint8Array(n);
    let at = 0;
    for (const b of this.out) {
      all.set(b, at);
      at += b.length;
    }
    this.out = [];
    return all;
  }

  hasOutput(): boolean {
    return this.out.length > 0;
  }

  pollEvent(): CoreEvent | undefined {
    return this.events.shift();
  }

  /**
   * Manual ACKs: the driver has consumed output through `seq`; an ACK for it goes out
   * (coalesced: call as often as you like, at most one ACK per new SEQ).
   */
  consumed(seq: number, now: number) {
    if (this.consumedUpTo === undefined || seqGt(seq, this.consumedUpTo)) this.consumedUpTo = seq;
    if (this.phase === "attached") this.flushAck(now);
  }

  /** Keepalive; `false` when the connection should be considered dead. */
  tick(now: number): boolean {
    switch (this.phase) {
      case "attached":
        if (now - this.lastTx >= this.opts.keepaliveMs) this.emit(FrameType.KEEPALIVE, new Uint8Array(0), now);
        return now - this.lastRx < this.opts.deadAfterMs;
      case "connecting":
      case "resuming":
        return now - this.lastRx < Math.min(this.opts.deadAfterMs, 15_000);
      default:
        return true;
    }
  }

  /** When {@link ClientCore.tick} next has work (ms), if ever. */
  nextTimer(): number | undefined {
    switch (this.phase) {
      case "attached":
        return Math.min(this.lastTx + this.opts.keepaliveMs, this.lastRx + this.opts.deadAfterMs);
      case "connecting":
      case "resuming":
        return this.lastRx + Math.min(this.opts.deadAfterMs, 15_000);
      default:
        return undefined;
    }
  }

  /** Bytes received on the connection. Throws {@link ProtocolError} on a broken stream. */
  onBytes(bytes: Uint8Array, now: number) {
    this.lastRx = now;
    let frames;
    try {
      frames = this.reader.push(bytes);
    } catch (e) {
      throw new ProtocolError(`broken frame from server: ${(e as Error).message}`);
    }
    for (const f of frames) {
      this.onFrame(f.seq, f.type, f.flags, f.payload, now);
      if (this.phase === "closed" || this.phase === "down") break;
    }
    if (this.phase === "attached") this.flushAck(now);
  }

  private flushAck(now: number) {
    if (this.highest === undefined) return;
    let upTo = this.highest;
    if (this.opts.acks === "manual") {
      if (this.consumedUpTo === undefined) return;
      if (seqGt(upTo, this.consumedUpTo)) upTo = this.consumedUpTo;
    }
    if (this.acked === undefined || seqGt(upTo, this.acked)) {
      this.out.push(encode({ sessionId: this.sessionId, seq: this.takeSeq(), type: FrameType.ACK, flags: 0, payload: encodeAck(upTo) }));
      this.lastTx = now;
      this.acked = upTo;
    }
  }

  private attach(now: number, lastClientSeq: number | undefined): number {
    this.phase = "attached";
    if (lastClientSeq !== undefined) {
      this.dropAcked(lastClientSeq);
      if (this.unacked.length === 0 && !seqGt(this.nextSeq, lastClientSeq)) {
        this.nextSeq = Math.max(1, (lastClientSeq + 1) >>> 0);
      }
    }
    if (this.pendingResize) {
      const [c, r] = this.pendingResize;
      this.pendingResize = undefined;
      this.resize(c, r, now);
    }
    for (const u of this.unacked) {
      this.out.push(encode({ sessionId: this.sessionId, seq: u.seq, type: FrameType.DATA, flags: 0, payload: u.bytes }));
    }
    const resent = this.unacked.length;
    if (resent > 0) this.lastTx = now;
    if (!this.reliable) {
      this.unacked = [];
      this.unackedBytes = 0;
    }
    return resent;
  }

  private dropAcked(through: number) {
    while (this.unacked.length > 0 && !seqGt(this.unacked[0].seq, through)) {
      this.unackedBytes -= this.unacked.shift()!.bytes.length;
    }
  }

  private payload<T>(what: string, f: () => T): T {
    try {
      return f();
    } catch (e) {
      throw new ProtocolError(`malformed ${what} from server: ${(e as Error).message}`);
    }
  }

  private onFrame(seq: number, type: number, flags: number, payload: Uint8Array, now: number) {
    if (type === FrameType.ERROR) {
      const e = this.payload("ERROR", () => parseError(payload));
      if (e.code === ErrorCode.AGENT_GONE) {
        this.phase = "closed";
        this.events.push({ kind: "ended" });
        return;
      }
      const fatal = FATAL.has(e.code) || (this.phase === "connecting" && e.code === ErrorCode.NO_AGENT);
      this.phase = fatal ? "closed" : "down";
      this.events.push({ kind: "error", code: e.code, message: e.message, fatal });
      return;
    }
    const p = this.phase;
    if (p === "connecting" && type === FrameType.ACCEPT) {
      const a = this.payload("ACCEPT", () => parseAccept(payload));
      this.sessionId = a.sessionId;
      this.resumeToken = a.resumeToken ?? new Uint8Array(16);
      this.reliable = this.opts.offerReliable && (a.caps & CAP_RELIABLE) !== 0;
      this.events.push({ kind: "accepted", sessionId: a.sessionId });
      this.attach(now, undefined);
    } else if (p === "resuming" && type === FrameType.RESUMED) {
      const r = this.payload("RESUMED", () => parseResumed(payload));
      this.lastResumed = r;
      const resent = this.attach(now, r.lastClientSeq);
      const gap = (flags & FLAG_GAP) !== 0;
      this.events.push({ kind: "resumed", gap, resent });
      if (gap) this.events.push({ kind: "gap" });
    } else if (p === "attached" && type === FrameType.DATA) {
      if (this.highest === undefined || seqGt(seq, this.highest)) {
        this.highest = seq;
        if (payload.length > 0) this.events.push({ kind: "data", bytes: payload, seq });
        else if (this.opts.acks === "manual") this.consumed(seq, now);
      }
    } else if (p === "attached" && type === FrameType.ACK) {
      try {
        const a = parseAck(payload);
        if (a.cumulative !== undefined) this.dropAcked(a.cumulative);
      } catch {
        // A malformed ACK from the server acknowledges nothing.
      }
    } else if (p === "attached" && type === FrameType.DISCONNECT) {
      this.phase = "closed";
      this.events.push({ kind: "ended" });
    } else if ((p === "attached" || p === "resuming") && type === FrameType.ROAM) {
      const r = this.payload("ROAM", () => parseRoam(payload));
      this.resumeToken = r.roamToken;
      this.phase = "down";
      this.events.push({ kind: "roam", address: r.address, port: r.port });
    } else if (p === "attached" && (type === FrameType.KEEPALIVE || type === FrameType.NACK || typeName(type) === "UNKNOWN")) {
      // Never answer a KEEPALIVE; NACK and unknown types are ignored.
    } else {
      throw new ProtocolError(`unexpected ${typeName(type)} from server while ${p}`);
    }
  }
}
