// The frame reader over chunked streams: any split of a stream of frames gives the same
// frames; a broken stream stays broken.
import { test } from "node:test";
import assert from "node:assert/strict";
import * as ct from "../src/index.js";

function stream(n: number): { bytes: Uint8Array; frames: ct.Frame[] } {
  const frames: ct.Frame[] = [];
  const parts: Uint8Array[] = [];
  for (let i = 1; i <= n; i++) {
    const payload = new Uint8Array((i * 37) % 300).map((_, j) => (i + j) & 0xff);
    const f = { sessionId: 9, seq: i, type: ct.FrameType.DATA, flags: 0, payload };
    frames.push(f);
    parts.push(ct.encode(f));
  }
  const bytes = new Uint8Array(parts.reduce((s, p) => s + p.length, 0));
  let at = 0;
  for (const p of parts) {
    bytes.set(p, at);
    at += p.length;
  }
  return { bytes, frames };
}

test("any chunking of a stream yields the same frames, in order", () => {
  const { bytes, frames } = stream(40);
  let seed = 12345;
  const rnd = (m: number) => {
    seed = (seed * 1103515245 + 12345) & 0x7fffffff;
    return seed % m;
  };
  for (const maxChunk of [1, 2, 7, 13, 64, 1000, bytes.length]) {
    const r = new ct.FrameReader();
    const got: ct.Frame[] = [];
    let at = 0;
    while (at < bytes.length) {
      const n = 1 + rnd(maxChunk);
      got.push(...r.push(bytes.subarray(at, Math.min(bytes.length, at + n))));
      at += n;
    }
    assert.equal(r.pending, 0, `chunks of up to ${maxChunk}`);
    assert.equal(got.length, frames.length);
    got.forEach((f, i) => {
      assert.equal(f.seq, frames[i].seq);
      assert.deepEqual(f.payload, frames[i].payload);
    });
  }
});

test("a broken stream is refused at once and stays broken", () => {
  const { bytes } = stream(3);
  const bad = bytes.slice();
  bad[bad.length - 1] ^= 0xff; // the last frame's CRC
  const r = new ct.FrameReader();
  assert.throws(() => r.push(bad), (e: unknown) => e instanceof ct.FrameError && e.code === "BAD_FRAME");
  assert.throws(() => r.push(bytes), ct.FrameError);
  const http = new ct.FrameReader();
  assert.throws(() => http.push(new TextEncoder().encode("GET / HTTP/1.1\r\n")), /not FLAG/);
});

test("a partial frame is kept, never more than the frame", () => {
  const { bytes } = stream(2);
  const r = new ct.FrameReader();
  const first = ct.decode(bytes);
  assert.equal(first.kind, "frame");
  if (first.kind !== "frame") return;
  assert.equal(r.push(bytes.subarray(0, first.used + 5)).length, 1);
  assert.equal(r.pending, 5);
  assert.equal(r.push(bytes.subarray(first.used + 5)).length, 1);
  assert.equal(r.pending, 0);
});
