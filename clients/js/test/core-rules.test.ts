// More of the sans-IO core without sockets (core.test.ts has the basics): the test plays the
// server, feeding frames and an injected clock, and reads back what the core writes. Mirrors
// the Rust core's tests (client/src/core.rs) and adds what the Session relies on: CONNECT's
// shape, queued input and resize, GAP, take-over, ERROR codes, the end of a session, ROAM (v4
// and v6, and as the answer to a RESUME), saved credentials, SEQ wrap, timers, broken streams.
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  CAP_RELIABLE,
  CAP_ROAM,
  CAP_V1,
  ClientCore,
  type CoreEvent,
  decode,
  encode,
  encodeAccept,
  encodeAck,
  encodeError,
  encodeResumed,
  ErrorCode,
  FLAG_GAP,
  FLAG_REPLAY,
  FrameType,
  MAX_SEND_CHUNK,
  parseConnect,
  parseResize,
  parseResume,
  ProtocolError,
  seqGt,
} from "../src/index.js";

const SID = 5;
const TOKEN = new Uint8Array(32).fill(0xab);
const RTOKEN = new Uint8Array(16).fill(3);
const te = new TextEncoder();
const td = new TextDecoder();

/** A server frame. */
function frame(seq: number, type: number, payload: Uint8Array | string = new Uint8Array(0), flags = 0, sid = SID) {
  return encode({ sessionId: sid, seq, type, flags, payload: typeof payload === "string" ? te.encode(payload) : payload });
}

function cat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((a, p) => a + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** The frames the core wrote. */
function written(c: ClientCore) {
  const bytes = c.takeOutput();
  const out: { sessionId: number; seq: number; type: number; flags: number; payload: Uint8Array }[] = [];
  let at = 0;
  while (at < bytes.length) {
    const d = decode(bytes.subarray(at));
    assert.equal(d.kind, "frame", "the core writes whole frames only");
    if (d.kind !== "frame") break;
    out.push({ ...d.frame, payload: d.frame.payload.slice() });
    at += d.used;
  }
  return out;
}

function events(c: ClientCore): CoreEvent[] {
  const out: CoreEvent[] = [];
  let e;
  while ((e = c.pollEvent())) out.push(e);
  return out;
}

const dataOf = (evs: CoreEvent[]) =>
  evs.filter((e): e is Extract<CoreEvent, { kind: "data" }> => e.kind === "data").map((e) => td.decode(e.bytes));

/** A core attached to session 5 (the server's ACCEPT took SEQ 1), its output drained. */
function accepted(opts: ConstructorParameters<typeof ClientCore>[3] = {}, caps = CAP_RELIABLE | CAP_ROAM): ClientCore {
  const c = new ClientCore(7, 1, TOKEN, opts);
  c.startConnect(new Uint8Array(16), 0);
  written(c);
  c.onBytes(frame(1, FrameType.ACCEPT, encodeAccept({ sessionId: SID, version: 1, caps, resumeToken: RTOKEN })), 0);
  assert.ok(c.attached);
  written(c);
  return c;
}

function resumed(lastClientSeq: number, firstReplaySeq: number) {
  return encodeResumed({ sessionId: SID, lastClientSeq, firstReplaySeq });
}

test("CONNECT: 58 bytes, session 0, SEQ 1, every capability offered", () => {
  const c = new ClientCore(7, 1, TOKEN);
  const nonce = new Uint8Array(16).fill(9);
  c.startConnect(nonce, 0);
  assert.ok(c.handshaking);
  const [f, ...rest] = written(c);
  assert.equal(rest.length, 0);
  assert.equal(f.type, FrameType.CONNECT);
  assert.equal(f.sessionId, 0);
  assert.equal(f.seq, 1);
  assert.equal(f.payload.length, 58);
  const p = parseConnect(f.payload);
  assert.equal(p.version, 1);
  assert.equal(p.caps, CAP_V1 | CAP_RELIABLE | CAP_ROAM);
  assert.equal(p.tenantId, 7);
  assert.equal(p.agentId, 1);
  assert.deepEqual(p.token, TOKEN);
  assert.deepEqual(p.nonce, nonce);

  const plain = new ClientCore(7, 1, TOKEN, { offerReliable: false, offerRoam: false });
  plain.startConnect(nonce, 0);
  assert.equal(parseConnect(written(plain)[0].payload).caps, CAP_V1);
});

test("ACCEPT: the session's id and token; input and a resize queued before it go out after it", () => {
  const c = new ClientCore(7, 1, TOKEN);
  c.resize(120, 40, 0); // before the connection is up
  c.startConnect(new Uint8Array(16), 0);
  c.sendData(te.encode("early"), 0);
  const hs = written(c);
  assert.deepEqual(hs.map((f) => f.type), [FrameType.CONNECT], "nothing before ACCEPT but CONNECT");
  assert.ok(!c.hasSession);
  c.onBytes(frame(1, FrameType.ACCEPT, encodeAccept({ sessionId: SID, version: 1, caps: CAP_RELIABLE, resumeToken: RTOKEN })), 1);
  assert.deepEqual(events(c), [{ kind: "accepted", sessionId: SID }]);
  assert.ok(c.attached && c.hasSession);
  assert.equal(c.sessionId, SID);
  assert.deepEqual(c.resumeToken, RTOKEN);
  const out = written(c);
  assert.deepEqual(out.map((f) => f.type), [FrameType.RESIZE, FrameType.DATA]);
  assert.ok(out.every((f) => f.sessionId === SID));
  assert.deepEqual(parseResize(out[0].payload), { cols: 120, rows: 40 });
  // SEQs: CONNECT 1, DATA (numbered when written) 2, RESIZE 3.
  assert.equal(out[1].seq, 2);
  assert.equal(td.decode(out[1].payload), "early");
  assert.equal(out[0].seq, 3);
  assert.equal(c.unackedFrames, 1, "RELIABLE: kept until acknowledged");
});

test("output is deduplicated and acknowledged with one coalesced ACK; KEEPALIVE is never answered", () => {
  const c = accepted();
  events(c);
  c.onBytes(cat(frame(2, FrameType.DATA, "a"), frame(3, FrameType.DATA, "b"), frame(4, FrameType.KEEPALIVE)), 1);
  const out = written(c);
  assert.equal(out.length, 1);
  assert.equal(out[0].type, FrameType.ACK);
  assert.deepEqual(out[0].payload, encodeAck(3));
  assert.deepEqual(dataOf(events(c)), ["a", "b"]);
  // A duplicate (or older) frame is dropped and not acknowledged again.
  c.onBytes(frame(3, FrameType.DATA, "b"), 2);
  assert.deepEqual(events(c), []);
  assert.equal(c.hasOutput(), false);
  assert.equal(c.lastSeq, 3);
});

test("resume: RESUME carries last_seq, the replay is delivered exactly once, in order", () => {
  const c = accepted();
  c.onBytes(cat(frame(2, FrameType.DATA, "a"), frame(3, FrameType.DATA, "b")), 1);
  c.connectionLost();
  assert.ok(!c.attached && !c.closed);
  c.startResume(2);
  const [r] = written(c);
  assert.equal(r.type, FrameType.RESUME);
  assert.equal(r.sessionId, SID);
  assert.deepEqual(parseResume(r.payload), { sessionId: SID, lastSeq: 3, token: RTOKEN });
  // The server replays from 3 (say its ring still held it): 3 is dropped, 5 is new.
  c.onBytes(
    cat(
      frame(6, FrameType.RESUMED, resumed(0, 3)),
      frame(3, FrameType.DATA, "b", FLAG_REPLAY),
      frame(5, FrameType.DATA, "c", FLAG_REPLAY),
      frame(7, FrameType.DATA, "d"),
    ),
    3,
  );
  const evs = events(c);
  assert.deepEqual(dataOf(evs), ["a", "b", "c", "d"]);
  assert.deepEqual(evs.find((e) => e.kind === "resumed"), { kind: "resumed", gap: false, resent: 0 });
  assert.equal(c.lastSeq, 7);
  assert.deepEqual(c.lastResumed, { sessionId: SID, lastClientSeq: 0, firstReplaySeq: 3 });
  const acks = written(c).filter((f) => f.type === FrameType.ACK);
  assert.equal(acks.length, 1);
  assert.deepEqual(acks[0].payload, encodeAck(7));
});

test("RELIABLE: input the server did not get is resent after RESUMED with its SEQ; SEQs continue", () => {
  const c = accepted();
  c.sendData(te.encode("x"), 1); // SEQ 2
  c.sendData(te.encode("y"), 1); // SEQ 3
  assert.deepEqual(written(c).map((f) => f.seq), [2, 3]);
  c.onBytes(frame(2, FrameType.ACK, encodeAck(2)), 2);
  assert.equal(c.unackedFrames, 1);
  assert.equal(c.unackedByteCount, 1);
  c.connectionLost();
  c.sendData(te.encode("z"), 3); // SEQ 4, queued while down
  assert.equal(c.hasOutput(), false, "nothing is written while down");
  c.startResume(4); // SEQ 5
  written(c);
  c.onBytes(frame(9, FrameType.RESUMED, resumed(2, 0), FLAG_GAP), 5);
  const data = written(c)
    .filter((f) => f.type === FrameType.DATA)
    .map((f) => [f.seq, td.decode(f.payload)]);
  assert.deepEqual(data, [
    [3, "y"],
    [4, "z"],
  ]);
  const evs = events(c);
  assert.ok(evs.some((e) => e.kind === "resumed" && e.gap && e.resent === 2));
  assert.ok(evs.some((e) => e.kind === "gap"));
  assert.equal(c.seqNext, 6);
  // RESUMED said the server had 3 already: it is not sent twice on the next resume.
  c.connectionLost();
  c.startResume(6);
  written(c);
  c.onBytes(frame(10, FrameType.RESUMED, resumed(3, 0)), 7);
  assert.deepEqual(
    written(c)
      .filter((f) => f.type === FrameType.DATA)
      .map((f) => f.seq),
    [4],
  );
  c.onBytes(frame(11, FrameType.ACK, encodeAck(4)), 8);
  assert.equal(c.unackedFrames, 0);
  assert.equal(c.unackedByteCount, 0);
});

test("a server without RELIABLE: nothing is kept for resend", () => {
  const c = accepted({}, 0);
  c.sendData(te.encode("x"), 1);
  assert.equal(written(c).length, 1);
  assert.equal(c.unackedFrames, 0);
});

test("large input is split into frames of at most MAX_SEND_CHUNK bytes", () => {
  const c = accepted();
  const big = new Uint8Array(MAX_SEND_CHUNK * 2 + 10).map((_, i) => i & 0xff);
  c.sendData(big, 1);
  const out = written(c);
  assert.deepEqual(out.map((f) => f.payload.length), [MAX_SEND_CHUNK, MAX_SEND_CHUNK, 10]);
  assert.deepEqual(cat(...out.map((f) => f.payload)), big);
  assert.deepEqual(out.map((f) => f.seq), [2, 3, 4]);
});

test("a frame split across reads at every byte gives the same result", () => {
  const stream = cat(
    frame(1, FrameType.ACCEPT, encodeAccept({ sessionId: SID, version: 1, caps: CAP_RELIABLE, resumeToken: RTOKEN })),
    frame(2, FrameType.DATA, "hello"),
    frame(3, FrameType.DATA, " world"),
  );
  const c = new ClientCore(7, 1, TOKEN);
  c.startConnect(new Uint8Array(16), 0);
  written(c);
  for (let i = 0; i < stream.length; i++) c.onBytes(stream.subarray(i, i + 1), i);
  assert.equal(dataOf(events(c)).join(""), "hello world");
  assert.equal(c.lastSeq, 3);
});

test("manual ACKs: only up to what the driver consumed, once per new SEQ", () => {
  const c = accepted({ acks: "manual" });
  c.onBytes(cat(frame(2, FrameType.DATA, "a"), frame(3, FrameType.DATA, "b")), 1);
  assert.equal(c.hasOutput(), false, "no ACK before the output is consumed");
  c.consumed(2, 2);
  let out = written(c);
  assert.equal(out.length, 1);
  assert.deepEqual(out[0].payload, encodeAck(2));
  c.consumed(2, 3);
  assert.equal(c.hasOutput(), false, "an ACK is sent once");
  c.consumed(3, 4);
  out = written(c);
  assert.deepEqual(out[0].payload, encodeAck(3));
});

test("KEEPALIVE when idle; a connection silent too long is dead; handshakes time out", () => {
  const c = accepted();
  assert.ok(c.tick(1_000));
  assert.equal(c.hasOutput(), false);
  assert.equal(c.nextTimer(), 15_000);
  assert.ok(c.tick(15_000));
  assert.equal(written(c)[0].type, FrameType.KEEPALIVE);
  assert.ok(c.tick(74_999));
  assert.equal(c.tick(80_000), false);

  const h = new ClientCore(7, 1, TOKEN, { keepaliveMs: 100, deadAfterMs: 1_000 });
  h.startConnect(new Uint8Array(16), 0);
  assert.ok(h.tick(999));
  assert.equal(h.tick(1_000), false, "no ACCEPT in time");
  assert.equal(new ClientCore(7, 1, TOKEN).nextTimer(), undefined, "no timers while down");
});

test("GAP on RESUMED is reported to the driver", () => {
  const c = accepted();
  c.onBytes(frame(2, FrameType.DATA, "a"), 1);
  events(c);
  c.connectionLost();
  c.startResume(2);
  written(c);
  c.onBytes(cat(frame(40, FrameType.RESUMED, resumed(0, 30), FLAG_GAP), frame(30, FrameType.DATA, "late", FLAG_REPLAY)), 3);
  const evs = events(c);
  assert.deepEqual(
    evs.map((e) => e.kind),
    ["resumed", "gap", "data"],
  );
  assert.deepEqual(c.lastResumed?.firstReplaySeq, 30);
});

test("TAKEN_OVER: the connection and the session are over for this client", () => {
  const c = accepted();
  c.onBytes(frame(2, FrameType.ERROR, encodeError({ code: ErrorCode.TAKEN_OVER, message: "resumed elsewhere" })), 1);
  assert.deepEqual(events(c).pop(), { kind: "error", code: ErrorCode.TAKEN_OVER, message: "resumed elsewhere", fatal: true });
  assert.ok(c.closed);
  c.sendData(te.encode("x"), 2);
  assert.equal(c.hasOutput(), false, "nothing is sent on a closed session");
});

test("ERROR codes: refusals are fatal, overload and friends are not", () => {
  for (const [code, fatal] of [
    [ErrorCode.AUTH_FAILED, true],
    [ErrorCode.BAD_CONNECT, true],
    [ErrorCode.UNSUPPORTED_VERSION, true],
    [ErrorCode.NO_AGENT, true], // while connecting
    [ErrorCode.OVERLOADED, false],
    [ErrorCode.RATE_LIMITED, false],
  ] as const) {
    const c = new ClientCore(7, 1, TOKEN);
    c.startConnect(new Uint8Array(16), 0);
    c.onBytes(encode({ sessionId: 0, seq: 0, type: FrameType.ERROR, flags: 0, payload: encodeError({ code, message: "no" }) }), 1);
    assert.deepEqual(events(c), [{ kind: "error", code, message: "no", fatal }], `code ${code}`);
    assert.equal(c.closed, fatal);
  }
  // A resume of an unknown (or expired) session is final too.
  const r = ClientCore.forResume(7, 1, SID, RTOKEN, 0, 1);
  r.startResume(0);
  r.onBytes(encode({ sessionId: 0, seq: 0, type: FrameType.ERROR, flags: 0, payload: encodeError({ code: ErrorCode.NO_SUCH_SESSION, message: "" }) }), 1);
  assert.ok(r.closed);
});

test("the session ends: DISCONNECT, or AGENT_GONE then DISCONNECT", () => {
  const c = accepted();
  events(c);
  c.onBytes(cat(frame(2, FrameType.DATA, "bye"), frame(3, FrameType.DISCONNECT)), 1);
  assert.deepEqual(
    events(c).map((e) => e.kind),
    ["data", "ended"],
  );
  assert.ok(c.closed);

  const g = accepted();
  events(g);
  g.onBytes(cat(frame(2, FrameType.ERROR, encodeError({ code: ErrorCode.AGENT_GONE, message: "" })), frame(3, FrameType.DISCONNECT)), 1);
  assert.deepEqual(events(g), [{ kind: "ended" }]);
  assert.ok(g.closed);
});

function roamPayload(family: 4 | 6, addr: number[], port: number, token: Uint8Array) {
  const p = new Uint8Array(1 + addr.length + 2 + 16);
  p[0] = family;
  p.set(addr, 1);
  new DataView(p.buffer).setUint16(1 + addr.length, port);
  p.set(token, 3 + addr.length);
  return p;
}

test("ROAM: the new node is reported and the next RESUME carries the roam token", () => {
  const c = accepted();
  c.onBytes(frame(2, FrameType.DATA, "a"), 1);
  events(c);
  const roamToken = new Uint8Array(16).fill(0x77);
  c.onBytes(frame(3, FrameType.ROAM, roamPayload(4, [10, 0, 0, 2], 7443, roamToken)), 2);
  assert.deepEqual(events(c), [{ kind: "roam", address: "10.0.0.2", port: 7443 }]);
  assert.ok(!c.attached && !c.closed);
  c.connectionLost();
  c.startResume(3);
  assert.deepEqual(parseResume(written(c)[0].payload), { sessionId: SID, lastSeq: 2, token: roamToken });
  // ROAM may also answer the RESUME itself (the session is held by yet another node).
  c.onBytes(frame(4, FrameType.ROAM, roamPayload(6, [0x20, 1, 0x0d, 0xb8, ...new Array(11).fill(0), 1], 7443, roamToken)), 4);
  assert.deepEqual(events(c), [{ kind: "roam", address: "2001:db8:0:0:0:0:0:1", port: 7443 }]);
});

test("forResume: a core rebuilt from saved credentials resumes where they left off", () => {
  const c = ClientCore.forResume(7, 1, SID, RTOKEN, 41, 100);
  assert.ok(c.hasSession);
  c.startResume(0);
  const [r] = written(c);
  assert.equal(r.seq, 100);
  assert.deepEqual(parseResume(r.payload), { sessionId: SID, lastSeq: 41, token: RTOKEN });
  c.onBytes(cat(frame(50, FrameType.RESUMED, resumed(0, 41)), frame(41, FrameType.DATA, "old", FLAG_REPLAY), frame(42, FrameType.DATA, "new", FLAG_REPLAY)), 1);
  assert.deepEqual(dataOf(events(c)), ["new"]);
});

test("SEQ comparison wraps (serial-number arithmetic)", () => {
  assert.ok(seqGt(2, 1));
  assert.ok(!seqGt(1, 1));
  assert.ok(seqGt(0, 0xffffffff));
  assert.ok(seqGt(5, 0xfffffff0));
  assert.ok(!seqGt(0xfffffff0, 5));
  const c = ClientCore.forResume(7, 1, SID, RTOKEN, 0xfffffffe, 0xffffffff);
  c.startResume(0);
  assert.equal(written(c)[0].seq, 0xffffffff);
  c.sendData(te.encode("x"), 0); // SEQ wraps to 1, never 0
  c.onBytes(cat(frame(9, FrameType.RESUMED, resumed(0, 0)), frame(0xffffffff, FrameType.DATA, "p"), frame(1, FrameType.DATA, "q")), 1);
  assert.deepEqual(dataOf(events(c)), ["p", "q"]);
  const data = written(c).filter((f) => f.type === FrameType.DATA);
  assert.equal(data[0].seq, 1);
});

test("broken server input throws ProtocolError (never a hang, never a silent skip)", () => {
  const good = frame(1, FrameType.ACCEPT, encodeAccept({ sessionId: SID, version: 1, caps: CAP_RELIABLE, resumeToken: RTOKEN }));
  const badCrc = good.slice();
  badCrc[badCrc.length - 1] ^= 0xff;
  const cases: [string, (c: ClientCore) => void][] = [
    ["garbage", (c) => c.onBytes(te.encode("HTTP/1.1 400 Bad Request\r\n"), 1)],
    ["a bad CRC", (c) => c.onBytes(badCrc, 1)],
    ["a bad FLAG after a good frame", (c) => c.onBytes(cat(good, new Uint8Array([0x00, 1, 2])), 1)],
    ["DATA before ACCEPT", (c) => c.onBytes(frame(1, FrameType.DATA, "x"), 1)],
    ["RESUMED answering a CONNECT", (c) => c.onBytes(frame(1, FrameType.RESUMED, resumed(0, 0)), 1)],
    ["a malformed ACCEPT", (c) => c.onBytes(frame(1, FrameType.ACCEPT, new Uint8Array(5)), 1)],
    ["a malformed ERROR", (c) => c.onBytes(frame(1, FrameType.ERROR, new Uint8Array(1)), 1)],
  ];
  for (const [what, feed] of cases) {
    const c = new ClientCore(7, 1, TOKEN);
    c.startConnect(new Uint8Array(16), 0);
    assert.throws(() => feed(c), ProtocolError, what);
  }
  // After the handshake too: a malformed ROAM, a CONNECT from the "server".
  const a = accepted();
  assert.throws(() => a.onBytes(frame(2, FrameType.ROAM, new Uint8Array(3)), 1), ProtocolError);
  const b = accepted();
  assert.throws(() => b.onBytes(frame(2, FrameType.CONNECT, new Uint8Array(58)), 1), ProtocolError);
  // The core is usable again on a new connection.
  b.connectionLost();
  b.startResume(2);
  b.onBytes(frame(3, FrameType.RESUMED, resumed(0, 0)), 3);
  assert.ok(b.attached);
});

test("a header that promises a long payload waits for it (the driver's timers end a stall)", () => {
  const c = new ClientCore(7, 1, TOKEN, { deadAfterMs: 5_000 });
  c.startConnect(new Uint8Array(16), 0);
  const hdr = new Uint8Array([0x7e, 0, 0, 0, 5, 0, 0, 0, 1, FrameType.ACCEPT, 0, 0xff, 0xff]);
  c.onBytes(hdr, 1);
  assert.deepEqual(events(c), []);
  assert.equal(c.tick(5_001), false, "the handshake deadline still applies");
});

test("unknown frame types and NACK are ignored once attached", () => {
  const c = accepted();
  events(c);
  c.onBytes(cat(frame(2, 0x77, "?"), frame(3, FrameType.NACK), frame(4, FrameType.DATA, "ok")), 1);
  assert.deepEqual(dataOf(events(c)), ["ok"]);
});

test("SUSPEND and DISCONNECT are written only while attached; DISCONNECT closes the core", () => {
  const c = accepted();
  c.suspend(1);
  assert.equal(written(c)[0].type, FrameType.SUSPEND);
  c.disconnect(2);
  assert.equal(written(c)[0].type, FrameType.DISCONNECT);
  assert.ok(c.closed);
  const d = new ClientCore(7, 1, TOKEN);
  d.suspend(0);
  d.disconnect(0);
  assert.equal(d.hasOutput(), false);
});
