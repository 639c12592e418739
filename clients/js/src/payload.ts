/**
 * Typed payloads (PROTOCOL.md §2): what a client sends (CONNECT, RESUME, ACK, RESIZE) and what
 * it reads (ACCEPT, RESUMED, ACK, ROAM, ERROR). Parsers throw {@link PayloadError} on a payload
 * of the wrong shape; they never read past it.
 */

/** A payload of the wrong shape. */
export class PayloadError extends Error {
  constructor(readonly frame: string, message: string) {
    super(`${frame}: ${message}`);
    this.name = "PayloadError";
  }
}

/** Client capability bits (§2.1). */
export const CAP_V1 = 0x01;
export const CAP_RELIABLE = 0x02;
export const CAP_ROAM = 0x04;

/** ERROR codes (§6). */
export const ErrorCode = {
  BAD_FRAME: 1,
  UNSUPPORTED_VERSION: 2,
  AUTH_FAILED: 3,
  NO_SUCH_SESSION: 4,
  NO_AGENT: 5,
  PROTOCOL_VIOLATION: 6,
  TOO_LARGE: 7,
  OVERLOADED: 8,
  TAKEN_OVER: 9,
  AGENT_GONE: 10,
  RATE_LIMITED: 11,
  BAD_CONNECT: 12,
} as const;

const view = (p: Uint8Array) => new DataView(p.buffer, p.byteOffset, p.byteLength);

export interface Connect {
  version: number;
  caps: number;
  /** Width of the caps field on the wire: 1 (the normal form), 2 or 4 bytes. */
  capsWidth?: 1 | 2 | 4;
  tenantId: number;
  agentId: number;
  token: Uint8Array; // 32 bytes
  nonce: Uint8Array; // 16 bytes
}

export function encodeConnect(c: Connect): Uint8Array {
  if (c.token.length !== 32 || c.nonce.length !== 16) {
    throw new PayloadError("CONNECT", "token must be 32 bytes and nonce 16");
  }
  const w = c.capsWidth ?? 1;
  const out = new Uint8Array(1 + w + 8 + 32 + 16);
  const dv = view(out);
  out[0] = c.version;
  if (w === 1) out[1] = c.caps;
  else if (w === 2) dv.setUint16(1, c.caps);
  else dv.setUint32(1, c.caps);
  dv.setUint32(1 + w, c.tenantId >>> 0);
  dv.setUint32(5 + w, c.agentId >>> 0);
  out.set(c.token, 9 + w);
  out.set(c.nonce, 41 + w);
  return out;
}

export function parseConnect(p: Uint8Array): Connect {
  const w = p.length === 58 ? 1 : p.length === 59 ? 2 : p.length === 61 ? 4 : 0;
  if (w === 0) throw new PayloadError("CONNECT", "must be 58, 59 or 61 bytes");
  const dv = view(p);
  return {
    version: p[0],
    caps: p[w],
    capsWidth: w as 1 | 2 | 4,
    tenantId: dv.getUint32(1 + w),
    agentId: dv.getUint32(5 + w),
    token: p.slice(9 + w, 41 + w),
    nonce: p.slice(41 + w, 57 + w),
  };
}

export interface Accept {
  sessionId: number;
  version: number;
  caps: number;
  /** Absent only in the legacy 6-byte form. */
  resumeToken?: Uint8Array;
}

export function parseAccept(p: Uint8Array): Accept {
  if (p.length !== 6 && p.length !== 22) throw new PayloadError("ACCEPT", "must be 6 or 22 bytes");
  return {
    sessionId: view(p).getUint32(0),
    version: p[4],
    caps: p[5],
    resumeToken: p.length === 22 ? p.slice(6, 22) : undefined,
  };
}

export function encodeAccept(a: Accept): Uint8Array {
  const out = new Uint8Array(a.resumeToken ? 22 : 6);
  view(out).setUint32(0, a.sessionId >>> 0);
  out[4] = a.version;
  out[5] = a.caps;
  if (a.resumeToken) out.set(a.resumeToken, 6);
  return out;
}

/** RESUME (§2.3): the 24-byte form with the token, or the 4-byte legacy form. */
export type Resume =
  | { sessionId: number; lastSeq: number; token: Uint8Array }
  | { sessionId: number; lastSeq?: undefined; token?: undefined };

export function encodeResume(r: Resume): Uint8Array {
  if (r.token === undefined) {
    const out = new Uint8Array(4);
    view(out).setUint32(0, r.sessionId >>> 0);
    return out;
  }
  if (r.token.length !== 16) throw new PayloadError("RESUME", "token must be 16 bytes");
  const out = new Uint8Array(24);
  view(out).setUint32(0, r.sessionId >>> 0);
  view(out).setUint32(4, r.lastSeq >>> 0);
  out.set(r.token, 8);
  return out;
}

export function parseResume(p: Uint8Array): Resume {
  if (p.length === 24) {
    return { sessionId: view(p).getUint32(0), lastSeq: view(p).getUint32(4), token: p.slice(8, 24) };
  }
  if (p.length === 4) return { sessionId: view(p).getUint32(0) };
  throw new PayloadError("RESUME", "must be 24 or 4 bytes");
}

export interface Resumed {
  sessionId: number;
  lastClientSeq: number;
  firstReplaySeq: number;
}

export function parseResumed(p: Uint8Array): Resumed {
  if (p.length !== 12) throw new PayloadError("RESUMED", "must be 12 bytes");
  const dv = view(p);
  return { sessionId: dv.getUint32(0), lastClientSeq: dv.getUint32(4), firstReplaySeq: dv.getUint32(8) };
}

export function encodeResumed(r: Resumed): Uint8Array {
  const out = new Uint8Array(12);
  const dv = view(out);
  dv.setUint32(0, r.sessionId >>> 0);
  dv.setUint32(4, r.lastClientSeq >>> 0);
  dv.setUint32(8, r.firstReplaySeq >>> 0);
  return out;
}

/** ACK (§2.5): empty (the oldest unacknowledged frame of this connection) or cumulative. */
export function parseAck(p: Uint8Array): { cumulative?: number } {
  if (p.length === 0) return {};
  if (p.length === 4) return { cumulative: view(p).getUint32(0) };
  throw new PayloadError("ACK", "must be empty or 4 bytes");
}

export function encodeAck(cumulative?: number): Uint8Array {
  if (cumulative === undefined) return new Uint8Array(0);
  const out = new Uint8Array(4);
  view(out).setUint32(0, cumulative >>> 0);
  return out;
}

export function parseResize(p: Uint8Array): { cols: number; rows: number } {
  if (p.length !== 4) throw new PayloadError("RESIZE", "must be 4 bytes");
  return { cols: view(p).getUint16(0), rows: view(p).getUint16(2) };
}

export function encodeResize(cols: number, rows: number): Uint8Array {
  const out = new Uint8Array(4);
  view(out).setUint16(0, cols);
  view(out).setUint16(2, rows);
  return out;
}

export interface Roam {
  family: 4 | 6;
  /** Dotted IPv4, or IPv6 as eight hex groups. */
  address: string;
  port: number;
  roamToken: Uint8Array;
}

export function parseRoam(p: Uint8Array): Roam {
  const fam = p[0];
  const alen = fam === 4 ? 4 : fam === 6 ? 16 : -1;
  if (alen < 0 || p.length !== 1 + alen + 2 + 16) throw new PayloadError("ROAM", "malformed");
  const a = p.subarray(1, 1 + alen);
  const address =
    fam === 4
      ? Array.from(a).join(".")
      : Array.from({ length: 8 }, (_, i) => ((a[2 * i] << 8) | a[2 * i + 1]).toString(16)).join(":");
  return {
    family: fam as 4 | 6,
    address,
    port: view(p).getUint16(1 + alen),
    roamToken: p.slice(3 + alen, 19 + alen),
  };
}

export interface ErrorFrame {
  code: number;
  message: string;
}

export function parseError(p: Uint8Array): ErrorFrame {
  if (p.length < 2) throw new PayloadError("ERROR", "must be at least 2 bytes");
  return { code: view(p).getUint16(0), message: new TextDecoder().decode(p.subarray(2)) };
}

export function encodeError(e: ErrorFrame): Uint8Array {
  const msg = new TextEncoder().encode(e.message);
  const out = new Uint8Array(2 + msg.length);
  view(out).setUint16(0, e.code);
  out.set(msg, 2);
  return out;
}
