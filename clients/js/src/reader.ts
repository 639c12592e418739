/**
 * A frame reader for a byte stream that arrives in chunks of any size (a TCP socket, the
 * binary messages of a WebSocket): push chunks, take whole frames. It keeps only the partial
 * frame at the end (never more than one frame's worth), and refuses a broken stream at the
 * first bad byte, as the server does.
 */
import { decode, Frame, FrameError, MAX_PAYLOAD } from "./frame.js";

export class FrameReader {
  private buf: Uint8Array = new Uint8Array(0);
  private broken: FrameError | null = null;

  constructor(private readonly maxPayload: number = MAX_PAYLOAD) {}

  /**
   * Adds `chunk` and returns the frames it completed, in order. Their payloads are copies
   * (they outlive the next push). Throws the {@link FrameError} that broke the stream, now and
   * on every later push.
   */
  push(chunk: Uint8Array): Frame[] {
    if (this.broken) throw this.broken;
    let data: Uint8Array;
    if (this.buf.length === 0) {
      data = chunk;
    } else {
      data = new Uint8Array(this.buf.length + chunk.length);
      data.set(this.buf);
      data.set(chunk, this.buf.length);
    }
    const out: Frame[] = [];
    let at = 0;
    try {
      while (at < data.length) {
        const d = decode(data.subarray(at), this.maxPayload);
        if (d.kind === "needMore") break;
        out.push({ ...d.frame, payload: d.frame.payload.slice() });
        at += d.used;
      }
    } catch (e) {
      if (e instanceof FrameError) this.broken = e;
      throw e;
    }
    this.buf = at === data.length ? new Uint8Array(0) : data.slice(at);
    return out;
  }

  /** Bytes of a partial frame waiting for the rest. */
  get pending(): number {
    return this.buf.length;
  }
}
