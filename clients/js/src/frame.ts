/**
 * The ClawTerm frame (PROTOCOL.md §1), as the Rust codec (core/src/proto/frame.rs) has it:
 *
 * ```text
 * 0      1          5     9      10      11    13        13+LEN
 * | FLAG | SESSION  | SEQ | TYPE | FLAGS | LEN | PAYLOAD | CRC |
 * ```
 *
 * Big-endian integers; the CRC-16/UMTS covers FLAG through the end of PAYLOAD. No byte
 * stuffing, no resynchronisation: a wrong FLAG or CRC breaks the stream.
 */
import { crc16 } from "./crc16.js";

/** First byte of every frame. */
export const FLAG = 0x7e;
/** Bytes before the payload. */
export const HEADER_LEN = 13;
/** Bytes after the payload. */
export const CRC_LEN = 2;
/** Largest payload LEN can express. */
export const MAX_PAYLOAD = 0xffff;

/** FLAGS bits (§1.1). */
export const FLAG_REPLAY = 0x01;
export const FLAG_GAP = 0x02;

/** Frame types (§2), by their contract names. */
export const FrameType = {
  CONNECT: 0x01,
  ACCEPT: 0x02,
  RESUME: 0x03,
  RESUMED: 0x04,
  DATA: 0x10,
  ACK: 0x11,
  NACK: 0x12,
  RESIZE: 0x13,
  KEEPALIVE: 0x20,
  SUSPEND: 0x30,
  DISCONNECT: 0x40,
  ROAM: 0x50,
  ERROR: 0xff,
} as const;

export type FrameTypeName = keyof typeof FrameType;

/** The contract name of a type code (`UNKNOWN` for codes this version does not know). */
export function typeName(code: number): FrameTypeName | "UNKNOWN" {
  for (const [k, v] of Object.entries(FrameType)) {
    if (v === code) return k as FrameTypeName;
  }
  return "UNKNOWN";
}

/** One decoded frame; `payload` is a view into the decoder's input. */
export interface Frame {
  sessionId: number;
  seq: number;
  type: number;
  flags: number;
  payload: Uint8Array;
}

/** Why a stream is broken: the contract's ERROR name and what was wrong. */
export class FrameError extends Error {
  constructor(
    readonly code: "BAD_FRAME" | "TOO_LARGE",
    message: string,
  ) {
    super(message);
    this.name = "FrameError";
  }
}

/** What {@link decode} found at the front of its input. */
export type Decoded =
  | { kind: "frame"; frame: Frame; used: number }
  | { kind: "needMore"; atLeast: number };

/**
 * Decodes the frame at the front of `buf` (which may hold several frames or part of one).
 * Refuses a bad FLAG at the first byte and an oversize LEN at the header, so a hostile peer
 * cannot make the reader buffer a frame it will refuse. Throws {@link FrameError}.
 */
export function decode(buf: Uint8Array, maxPayload: number = MAX_PAYLOAD): Decoded {
  if (buf.length === 0) return { kind: "needMore", atLeast: HEADER_LEN };
  if (buf[0] !== FLAG) {
    throw new FrameError("BAD_FRAME", `first byte 0x${buf[0].toString(16)} is not FLAG 0x7e`);
  }
  if (buf.length < HEADER_LEN) return { kind: "needMore", atLeast: HEADER_LEN - buf.length };
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const len = dv.getUint16(11);
  if (len > maxPayload) {
    throw new FrameError("TOO_LARGE", `LEN ${len} is over the maximum payload ${maxPayload}`);
  }
  const total = HEADER_LEN + len + CRC_LEN;
  if (buf.length < total) return { kind: "needMore", atLeast: total - buf.length };
  const body = buf.subarray(0, HEADER_LEN + len);
  const want = dv.getUint16(HEADER_LEN + len);
  const got = crc16(body);
  if (want !== got) {
    throw new FrameError("BAD_FRAME", `CRC 0x${want.toString(16)} where 0x${got.toString(16)} was computed`);
  }
  return {
    kind: "frame",
    frame: {
      sessionId: dv.getUint32(1),
      seq: dv.getUint32(5),
      type: buf[9],
      flags: buf[10],
      payload: buf.subarray(HEADER_LEN, HEADER_LEN + len),
    },
    used: total,
  };
}

/** Encodes one frame. Throws {@link FrameError} for a payload over {@link MAX_PAYLOAD}. */
export function encode(f: Frame): Uint8Array {
  if (f.payload.length > MAX_PAYLOAD) {
    throw new FrameError("TOO_LARGE", `payload of ${f.payload.length} bytes (max ${MAX_PAYLOAD})`);
  }
  const out = new Uint8Array(HEADER_LEN + f.payload.length + CRC_LEN);
  const dv = new DataView(out.buffer);
  out[0] = FLAG;
  dv.setUint32(1, f.sessionId >>> 0);
  dv.setUint32(5, f.seq >>> 0);
  out[9] = f.type & 0xff;
  out[10] = f.flags & 0xff;
  dv.setUint16(11, f.payload.length);
  out.set(f.payload, HEADER_LEN);
  dv.setUint16(HEADER_LEN + f.payload.length, crc16(out.subarray(0, HEADER_LEN + f.payload.length)));
  return out;
}
