/**
 * The WebSocket transport, for the browser (its native `WebSocket`) and Node (the `ws`
 * package, passed in as `WebSocket`): `ws://HOST:PORT/ws` or `wss://…`. Every send is one
 * binary message holding whole frames; received messages are read as one byte stream (the
 * server sends one or more whole frames per message).
 */
import type { Conn, ConnHandlers, Connector } from "./transport.js";

/** The part of the WebSocket API used here (the browser's and `ws`'s). */
export interface WebSocketLike {
  binaryType: string;
  readonly readyState: number;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code?: number; reason?: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  send(data: Uint8Array): void;
  close(code?: number, reason?: string): void;
}

export type WebSocketCtor = new (url: string, protocols?: string | string[]) => WebSocketLike;

export interface WebSocketOptions {
  /** The WebSocket class: the browser's by default; in Node, `(await import("ws")).WebSocket`. */
  WebSocket?: WebSocketCtor;
}

function toBytes(data: unknown): Uint8Array | null {
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  if (Array.isArray(data)) {
    // `ws` with fragmented messages may hand over a list of buffers.
    const parts = data.map(toBytes).filter((p): p is Uint8Array => p !== null);
    const all = new Uint8Array(parts.reduce((a, p) => a + p.length, 0));
    let at = 0;
    for (const p of parts) {
      all.set(p, at);
      at += p.length;
    }
    return all;
  }
  return null;
}

export function webSocketConnector(opts: WebSocketOptions = {}): Connector {
  return (url: string, h: ConnHandlers): Conn => {
    const Ctor = opts.WebSocket ?? (globalThis as unknown as { WebSocket?: WebSocketCtor }).WebSocket;
    if (!Ctor) throw new Error("no WebSocket class: pass one (in Node: the `ws` package)");
    let done = false;
    const finish = (why: string) => {
      if (done) return;
      done = true;
      h.closed(why);
    };
    let ws: WebSocketLike;
    try {
      ws = new Ctor(url, ["clawterm"]);
    } catch (e) {
      queueMicrotask(() => finish(`WebSocket: ${(e as Error).message}`));
      return { send() {}, close() {} };
    }
    ws.binaryType = "arraybuffer";
    ws.onopen = () => {
      if (!done) h.open();
    };
    ws.onmessage = (ev) => {
      if (done) return;
      const b = toBytes(ev.data);
      if (b === null) {
        finish("the server sent a text message");
        ws.close(1003, "binary messages only");
        return;
      }
      h.data(b);
    };
    ws.onerror = () => finish("WebSocket error");
    ws.onclose = (ev) => finish(`WebSocket closed${ev.code ? ` (${ev.code}${ev.reason ? `: ${ev.reason}` : ""})` : ""}`);
    return {
      send(bytes: Uint8Array) {
        if (!done && ws.readyState === 1) ws.send(bytes);
      },
      close() {
        if (done) return;
        finish("closed by the client");
        try {
          ws.close();
        } catch {
          // already closing
        }
      },
      end() {
        // A WebSocket close is sent after the messages already queued.
        if (done) return;
        finish("closed by the client");
        try {
          ws.close(1000);
        } catch {
          // already closing
        }
      },
    };
  };
}
