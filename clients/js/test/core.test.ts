// The sans-IO core without sockets: handshake, replay de-duplication and coalesced ACKs,
// manual ACKs, RELIABLE resend after RESUMED, ROAM, and a server breaking the rules.
import { test } from "node:test";
import assert from "node:assert/strict";
import { ClientCore, ProtocolError } from "../src/core.js";
import { encode, FrameType, FLAG_REPLAY, FLAG_GAP, type Frame } from "../src/frame.js";
import { FrameReader } from "../src/reader.js";
import { encodeAccept, encodeResumed, CAP_RELIABLE, parseAck, parseResume } from "../src/payload.js";

const f = (type: number, seq: number, payload: Uint8Array = new Uint8Array(0), flags = 0) =>
  encode({ sessionId: 5, seq, type, flags, payload });
const text = (s: string) => new TextEncoder().encode(s);
const sent = (c: ClientCore): Frame[] => new FrameReader().push(c.takeOutput());

function accepted(opts = {}): ClientCore {
  const c = new ClientCore(7, 1, new Uint8Array(32).fill(0xab), opts);
  c.startConnect(new Uint8Array(16), 0);
  const hello = sent(c);
  assert.equal(hello[0].type, FrameType.CONNECT);
  assert.equal(hello[0].payload.length, 58);
  c.onBytes(f(FrameType.ACCEPT, 1, encodeAccept({ sessionId: 5, version: 1, caps: CAP_RELIABLE, resumeToken: new Uint8Array(16).fill(3) })), 0);
  assert.ok(c.attached);
  assert.deepEqual(c.pollEvent(), { kind: "accepted", sessionId: 5 });
  return c;
}

test("replayed output is delivered once and acknowledged with one ACK per read", () => {
  const c = accepted();
  c.onBytes(new Uint8Array([...f(FrameType.DATA, 2, text("a")), ...f(FrameType.DATA, 3, text("b")), ...f(FrameType.KEEPALIVE, 4)]), 1);
  const out = sent(c);
  assert.equal(out.length, 1, "one coalesced ACK, no KEEPALIVE answer");
  assert.equal(out[0].type, FrameType.ACK);
  assert.equal(parseAck(out[0].payload).cumulative, 3);
  assert.equal((c.pollEvent() as { bytes: Uint8Array }).bytes[0], 0x61);
  assert.equal((c.pollEvent() as { bytes: Uint8Array }).bytes[0], 0x62);
  // The connection drops; RESUME says what we have; the replay of 3 is not delivered again.
  c.connectionLost();
  c.startResume(2);
  const r = parseResume(sent(c)[0].payload);
  assert.equal(r.lastSeq, 3);
  c.onBytes(new Uint8Array([...f(FrameType.RESUMED, 9, encodeResumed({ sessionId: 5, lastClientSeq: 0, firstReplaySeq: 3 })), ...f(FrameType.DATA, 3, text("b"), FLAG_REPLAY), ...f(FrameType.DATA, 4, text("c"), FLAG_REPLAY)]), 3);
  assert.equal(c.pollEvent()?.kind, "resumed");
  const d = c.pollEvent() as { kind: string; bytes: Uint8Array; seq: number };
  assert.deepEqual([d.kind, d.bytes[0], d.seq], ["data", 0x63, 4]);
  assert.equal(c.pollEvent(), undefined);
});

test("manual ACKs go only as far as what was consumed", () => {
  const c = accepted({ acks: "manual" });
  c.onBytes(new Uint8Array([...f(FrameType.DATA, 2, text("a")), ...f(FrameType.DATA, 3, text("b"))]), 1);
  assert.equal(sent(c).length, 0, "nothing consumed yet");
  c.consumed(2, 2);
  const out = sent(c);
  assert.equal(parseAck(out[0].payload).cumulative, 2);
  c.consumed(2, 3);
  assert.equal(sent(c).length, 0, "no second ACK for the same SEQ");
});

test("unacknowledged input is resent after RESUMED, from what the server has", () => {
  const c = accepted();
  sent(c);
  c.sendData(text("one"), 1);
  c.sendData(text("two"), 1);
  const first = sent(c).map((x) => x.seq);
  assert.equal(first.length, 2);
  c.connectionLost();
  c.sendData(text("three"), 2); // queued while down
  c.startResume(3);
  sent(c);
  // The server had received "one" only.
  c.onBytes(f(FrameType.RESUMED, 9, encodeResumed({ sessionId: 5, lastClientSeq: first[0], firstReplaySeq: 0 }), FLAG_GAP), 4);
  assert.deepEqual(c.pollEvent(), { kind: "resumed", gap: true, resent: 2 });
  assert.deepEqual(c.pollEvent(), { kind: "gap" });
  const again = sent(c).filter((x) => x.type === FrameType.DATA).map((x) => new TextDecoder().decode(x.payload));
  assert.deepEqual(again, ["two", "three"]);
});

test("ROAM names the new node and keeps the token for the RESUME there", () => {
  const c = accepted();
  const p = new Uint8Array(1 + 4 + 2 + 16);
  p.set([4, 10, 0, 0, 2], 0);
  new DataView(p.buffer).setUint16(5, 7220);
  p.fill(9, 7);
  c.onBytes(f(FrameType.ROAM, 2, p), 1);
  assert.deepEqual(c.pollEvent(), { kind: "roam", address: "10.0.0.2", port: 7220 });
  assert.deepEqual(Array.from(c.resumeToken), Array(16).fill(9));
  assert.ok(!c.attached);
});

test("a server breaking the rules is a protocol error", () => {
  const c = accepted();
  assert.throws(() => c.onBytes(f(FrameType.ACCEPT, 2, new Uint8Array(22)), 1), ProtocolError);
  const d = accepted();
  assert.throws(() => d.onBytes(text("garbage"), 1), ProtocolError);
  const e = new ClientCore(7, 1, new Uint8Array(32));
  e.startConnect(new Uint8Array(16), 0);
  assert.throws(() => e.onBytes(f(FrameType.DATA, 2, text("x")), 1), ProtocolError);
});
