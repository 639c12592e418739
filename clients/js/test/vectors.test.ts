// The codec against every frame vector of the project (tests/vectors/frames.json, the copy
// the Rust tests use too): decode, re-encode byte for byte, typed payloads; broken streams
// refused; every prefix of a frame "needs more".
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { dirname, join } from "node:path";
import * as ct from "../src/index.js";

const here = dirname(fileURLToPath(import.meta.url));
// dist/test → the repository's tests/vectors.
const vectors = JSON.parse(
  readFileSync(join(here, "..", "..", "..", "..", "tests", "vectors", "frames.json"), "utf8"),
);
const hex = (b: Uint8Array) => Buffer.from(b).toString("hex");
const bytes = (h: string) => new Uint8Array(Buffer.from(h, "hex"));

test("CRC-16/UMTS check value", () => {
  assert.equal(ct.crc16(new TextEncoder().encode("123456789")), 0xfee8);
  assert.equal(Number(vectors.crc.check_ascii_123456789), 0xfee8);
});

test("every frame vector decodes, re-encodes byte for byte, and its payload parses", () => {
  assert.ok(vectors.frames.length >= 19);
  for (const v of vectors.frames) {
    const buf = bytes(v.hex);
    const d = ct.decode(buf);
    assert.equal(d.kind, "frame", v.name);
    if (d.kind !== "frame") continue;
    const f = d.frame;
    const want = v.decoded;
    assert.equal(d.used, buf.length, v.name);
    assert.equal(f.sessionId, want.session_id, v.name);
    assert.equal(f.seq, want.seq, v.name);
    assert.equal(ct.typeName(f.type), want.type, v.name);
    assert.equal(f.flags, want.flags, v.name);
    if (want.payload_hex !== undefined) assert.equal(hex(f.payload), want.payload_hex, v.name);
    if (want.payload_len !== undefined) assert.equal(f.payload.length, want.payload_len, v.name);
    assert.equal(hex(ct.encode(f)), v.hex, `${v.name} re-encoded`);
    switch (want.type) {
      case "CONNECT": {
        const c = ct.parseConnect(f.payload);
        assert.equal(c.version, want.version);
        assert.equal(c.caps, want.caps);
        assert.equal(c.tenantId, want.tenant_id);
        assert.equal(c.agentId, want.agent_id);
        assert.equal(hex(c.token), want.token_hex);
        if (want.nonce_hex) assert.equal(hex(c.nonce), want.nonce_hex);
        if (c.capsWidth === 1) assert.equal(hex(ct.encodeConnect(c)), want.payload_hex);
        break;
      }
      case "ACCEPT": {
        const a = ct.parseAccept(f.payload);
        assert.equal(a.sessionId, want.session_id);
        assert.equal(hex(a.resumeToken!), want.resume_token_hex);
        assert.equal(hex(ct.encodeAccept(a)), want.payload_hex);
        break;
      }
      case "RESUME": {
        const r = ct.parseResume(f.payload);
        if (want.resume_token_hex) {
          assert.equal(r.lastSeq, want.last_seq);
          assert.equal(hex(r.token!), want.resume_token_hex);
        }
        assert.equal(hex(ct.encodeResume(r)), want.payload_hex);
        break;
      }
      case "RESUMED": {
        const r = ct.parseResumed(f.payload);
        assert.equal(r.lastClientSeq, want.last_client_seq);
        assert.equal(r.firstReplaySeq, want.first_replay_seq);
        assert.equal(hex(ct.encodeResumed(r)), want.payload_hex);
        assert.ok(f.flags & ct.FLAG_GAP);
        break;
      }
      case "ACK": {
        const a = ct.parseAck(f.payload);
        assert.equal(hex(ct.encodeAck(a.cumulative)), want.payload_hex);
        break;
      }
      case "RESIZE": {
        const r = ct.parseResize(f.payload);
        assert.deepEqual(r, { cols: want.cols, rows: want.rows });
        assert.equal(hex(ct.encodeResize(r.cols, r.rows)), want.payload_hex);
        break;
      }
      case "ROAM": {
        const r = ct.parseRoam(f.payload);
        assert.equal(r.family, want.family);
        assert.equal(r.address, want.address);
        assert.equal(r.port, want.port);
        break;
      }
      case "ERROR": {
        const e = ct.parseError(f.payload);
        assert.equal(e.code, want.code);
        assert.equal(e.message, want.message);
        assert.equal(hex(ct.encodeError(e)), want.payload_hex);
        break;
      }
    }
  }
});

test("every bad frame vector breaks the stream with BAD_FRAME", () => {
  for (const v of vectors.bad_frames) {
    assert.throws(
      () => ct.decode(bytes(v.hex)),
      (e: unknown) => e instanceof ct.FrameError && e.code === v.error,
      v.name,
    );
  }
});

test("every incomplete vector, and every prefix of every frame, needs more", () => {
  for (const v of vectors.incomplete_frames) {
    assert.equal(ct.decode(bytes(v.hex)).kind, "needMore", v.name);
  }
  for (const v of vectors.frames) {
    const buf = bytes(v.hex);
    for (let n = 0; n < buf.length; n++) {
      assert.equal(ct.decode(buf.subarray(0, n)).kind, "needMore", `${v.name}[..${n}]`);
    }
  }
});

test("an oversize LEN is refused from the header alone", () => {
  const f = ct.encode({ sessionId: 1, seq: 1, type: ct.FrameType.DATA, flags: 0, payload: new Uint8Array(2000) });
  assert.throws(() => ct.decode(f.subarray(0, ct.HEADER_LEN), 1024), /LEN 2000/);
});

test("several frames in one buffer decode one after the other", () => {
  const a = ct.encode({ sessionId: 5, seq: 1, type: ct.FrameType.DATA, flags: 0, payload: bytes("616263") });
  const b = ct.encode({ sessionId: 5, seq: 2, type: ct.FrameType.KEEPALIVE, flags: 0, payload: new Uint8Array(0) });
  const both = new Uint8Array([...a, ...b]);
  const d1 = ct.decode(both);
  assert.equal(d1.kind, "frame");
  if (d1.kind !== "frame") return;
  const d2 = ct.decode(both.subarray(d1.used));
  assert.equal(d2.kind, "frame");
  if (d2.kind === "frame") assert.equal(d2.frame.seq, 2);
});
