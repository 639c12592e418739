// The connectors on their own, against tiny servers in the test (no clawtermd): the WebSocket
// one with the `ws` package on both ends (each send is one binary message; received messages
// are one byte stream, however the server splits it; text messages, closes and a dead port),
// a Session over WebSocket against a fake ClawTerm server that splits its frames across
// messages at every byte, and the TCP one, plaintext and TLS with `ca` and `servername`; a
// Session told to ROAM between two fake TLS nodes keeps checking the name it first used.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import net from "node:net";
import tls from "node:tls";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { WebSocket, WebSocketServer, type RawData } from "ws";
import {
  CAP_RELIABLE,
  type ConnHandlers,
  type Connector,
  encode,
  encodeAccept,
  encodeResumed,
  FrameReader,
  FrameType,
  parseConnect,
  parseResume,
  Session,
  webSocketConnector,
} from "../src/index.js";
import { splitHostPort, tcpConnector } from "../src/tcp.js";

const wsConnector = webSocketConnector({ WebSocket: WebSocket as never });
const te = new TextEncoder();

function toBuf(d: RawData): Buffer {
  return Array.isArray(d) ? Buffer.concat(d) : Buffer.from(d as ArrayBuffer);
}

/** A `ws` server on a free port; `onConn` gets each connection. */
async function wsServer(onConn: (ws: WebSocket, protocol: string) => void) {
  const srv = new WebSocketServer({ host: "127.0.0.1", port: 0, path: "/ws" });
  srv.on("connection", (ws) => onConn(ws, ws.protocol));
  await new Promise<void>((r) => srv.once("listening", () => r()));
  const port = (srv.address() as net.AddressInfo).port;
  return {
    url: `ws://127.0.0.1:${port}/ws`,
    close: () =>
      new Promise<void>((r) => {
        for (const c of srv.clients) c.terminate();
        srv.close(() => r());
      }),
  };
}

/** Opens a connection and records what its handlers see. */
function dial(connector: Connector, endpoint: string) {
  const rec = { opened: 0, closed: [] as string[], bytes: [] as Uint8Array[] };
  let onOpen: () => void = () => {};
  let onClose: () => void = () => {};
  const opened = new Promise<void>((r) => (onOpen = r));
  const closed = new Promise<void>((r) => (onClose = r));
  const h: ConnHandlers = {
    open() {
      rec.opened++;
      onOpen();
    },
    data(b) {
      rec.bytes.push(b.slice());
      onData();
    },
    closed(reason) {
      rec.closed.push(reason);
      onClose();
    },
  };
  let onData = () => {};
  const conn = connector(endpoint, h);
  const received = () => Buffer.concat(rec.bytes.map((b) => Buffer.from(b)));
  const until = (n: number, ms = 5000) =>
    new Promise<void>((res, rej) => {
      const t = setTimeout(() => rej(new Error(`only ${received().length} of ${n} bytes`)), ms);
      const check = () => {
        if (received().length >= n) {
          clearTimeout(t);
          res();
        }
      };
      onData = check;
      check();
    });
  return { conn, rec, opened, closed, received, until };
}

function bounded<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let t: ReturnType<typeof setTimeout>;
  return Promise.race([
    p.finally(() => clearTimeout(t)),
    new Promise<T>((_, rej) => (t = setTimeout(() => rej(new Error(`timed out: ${what}`)), ms))),
  ]);
}

test("WebSocket: each send is one binary message; the server's messages come back as bytes", { timeout: 10000 }, async () => {
  const got: Buffer[] = [];
  let proto = "";
  const srv = await wsServer((ws, p) => {
    proto = p;
    ws.on("message", (d, isBinary) => {
      assert.ok(isBinary, "binary messages only");
      got.push(toBuf(d));
      ws.send(toBuf(d)); // echo, one message each
    });
  });
  try {
    const c = dial(wsConnector, srv.url);
    await bounded(c.opened, 5000, "open");
    assert.equal(proto, "clawterm", "the subprotocol is offered");
    const sends = [te.encode("one"), new Uint8Array(70000).fill(7), te.encode("three")];
    for (const s of sends) c.conn.send(s);
    const total = sends.reduce((a, s) => a + s.length, 0);
    await c.until(total);
    assert.deepEqual(
      got.map((g) => g.length),
      sends.map((s) => s.length),
      "one message per send, nothing merged or split",
    );
    assert.deepEqual(c.received(), Buffer.concat(sends.map((s) => Buffer.from(s))));
    assert.ok(c.rec.bytes.every((b) => b instanceof Uint8Array));
    c.conn.close();
    await bounded(c.closed, 2000, "closed");
    c.conn.send(te.encode("after close")); // ignored, no throw
    assert.deepEqual(c.rec.closed, ["closed by the client"]);
    assert.equal(c.rec.opened, 1);
  } finally {
    await srv.close();
  }
});

test("WebSocket: frames split across messages or batched in one read as one stream", { timeout: 10000 }, async () => {
  const frames = Array.from({ length: 30 }, (_, i) =>
    encode({ sessionId: 9, seq: i + 1, type: FrameType.DATA, flags: 0, payload: new Uint8Array((i * 41) % 500).fill(i) }),
  );
  const stream = Buffer.concat(frames.map((f) => Buffer.from(f)));
  const srv = await wsServer((ws) => {
    // Messages of 1, 2, 3, … bytes: most frames straddle several messages.
    let at = 0;
    for (let n = 1; at < stream.length; n = (n % 97) + 1) {
      ws.send(stream.subarray(at, at + n));
      at += n;
    }
  });
  try {
    const c = dial(wsConnector, srv.url);
    await c.until(stream.length);
    const reader = new FrameReader();
    const out = c.rec.bytes.flatMap((b) => reader.push(b));
    assert.equal(out.length, frames.length);
    assert.deepEqual(
      out.map((f) => f.seq),
      frames.map((_, i) => i + 1),
    );
    assert.equal(reader.pending, 0);
    c.conn.close();
  } finally {
    await srv.close();
  }
});

test("WebSocket: a text message, a server close and a dead port each end the connection once", { timeout: 10000 }, async () => {
  const srv = await wsServer((ws) => {
    ws.on("message", (d) => {
      const m = toBuf(d).toString();
      if (m === "text please") ws.send("this is text");
      if (m === "bye") ws.close(1000, "done");
    });
  });
  try {
    const a = dial(wsConnector, srv.url);
    await bounded(a.opened, 5000, "open");
    a.conn.send(te.encode("text please"));
    await bounded(a.closed, 5000, "closed after text");
    assert.equal(a.rec.closed.length, 1);
    assert.match(a.rec.closed[0], /text/);

    const b = dial(wsConnector, srv.url);
    await bounded(b.opened, 5000, "open");
    b.conn.send(te.encode("bye"));
    await bounded(b.closed, 5000, "closed by the server");
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(b.rec.closed.length, 1, "closed once");
    assert.match(b.rec.closed[0], /1000/);
  } finally {
    await srv.close();
  }
  // Nothing listens there any more.
  const dead = dial(wsConnector, srv.url);
  await bounded(dead.closed, 5000, "a refused connection");
  assert.equal(dead.rec.opened, 0);
  assert.equal(dead.rec.closed.length, 1);
});

test("WebSocket: a Session's every flush is one message of whole frames, whatever the server's split", { timeout: 15000 }, async () => {
  let clientMessages = 0;
  const srv = await wsServer((ws) => {
    const reader = new FrameReader();
    let sseq = 1;
    let sid = 0;
    const send = (type: number, payload: Uint8Array) => {
      const f = Buffer.from(encode({ sessionId: sid, seq: sseq++, type, flags: 0, payload }));
      // One byte per message: the client must read messages as a byte stream.
      for (let i = 0; i < f.length; i++) ws.send(f.subarray(i, i + 1));
    };
    ws.on("message", (d) => {
      clientMessages++;
      const before = reader.pending;
      assert.equal(before, 0, "the previous message ended on a frame boundary");
      for (const f of reader.push(toBuf(d))) {
        if (f.type === FrameType.CONNECT) {
          assert.equal(parseConnect(f.payload).tenantId, 7);
          sid = 1234;
          send(FrameType.ACCEPT, encodeAccept({ sessionId: sid, version: 1, caps: CAP_RELIABLE, resumeToken: new Uint8Array(16).fill(1) }));
        } else if (f.type === FrameType.DATA) {
          send(FrameType.DATA, f.payload); // echo
        }
      }
      assert.equal(reader.pending, 0, "a message holds whole frames only");
    });
  });
  const s = Session.connect({ url: srv.url, connector: wsConnector, tenant: 7, agent: 1, token: "cd".repeat(32), cols: 80, rows: 24 });
  try {
    let text = "";
    s.on("data", (b) => (text += Buffer.from(b).toString()));
    await bounded(
      new Promise<void>((r) => s.on("status", (st) => st.state === "connected" && r())),
      5000,
      "connected",
    );
    assert.equal(s.credentials()!.sessionId, 1234);
    s.write("x".repeat(3000)); // three DATA frames in one flush
    s.write("yz");
    await bounded(
      (async () => {
        while (text.length < 3002) await new Promise((r) => setTimeout(r, 10));
      })(),
      5000,
      "the echo",
    );
    assert.equal(text, "x".repeat(3000) + "yz");
    assert.ok(clientMessages >= 3);
  } finally {
    s.close();
    await srv.close();
  }
});

test("TCP: plaintext echo, IPv4 and (where the host has it) IPv6 endpoints", { timeout: 10000 }, async () => {
  assert.deepEqual(splitHostPort("127.0.0.1:7220"), ["127.0.0.1", 7220]);
  assert.deepEqual(splitHostPort("[::1]:7220"), ["::1", 7220]);
  assert.deepEqual(splitHostPort("node1.example:1"), ["node1.example", 1]);
  assert.throws(() => splitHostPort("no-port"));
  const srv = net.createServer((c) => {
    c.on("error", () => {});
    c.pipe(c);
  });
  await new Promise<void>((r) => srv.listen(0, "127.0.0.1", () => r()));
  const port = (srv.address() as net.AddressInfo).port;
  try {
    const c = dial(tcpConnector(), `127.0.0.1:${port}`);
    await bounded(c.opened, 5000, "open");
    const big = new Uint8Array(200_000).map((_, i) => i & 0xff);
    c.conn.send(big);
    await c.until(big.length);
    assert.deepEqual(c.received(), Buffer.from(big));
    c.conn.close();
    await bounded(c.closed, 2000, "closed");
    assert.deepEqual(c.rec.closed, ["closed by the client"]);
  } finally {
    srv.close();
  }
  const dead = dial(tcpConnector(), `127.0.0.1:${port}`);
  await bounded(dead.closed, 5000, "refused");
  assert.equal(dead.rec.opened, 0);
  assert.equal(dead.rec.closed.length, 1);

  const v6 = net.createServer((c) => c.pipe(c));
  const ok = await new Promise<boolean>((r) => {
    v6.once("error", () => r(false));
    v6.listen(0, "::1", () => r(true));
  });
  if (!ok) return; // no IPv6 loopback here
  try {
    const c = dial(tcpConnector(), `[::1]:${(v6.address() as net.AddressInfo).port}`);
    await bounded(c.opened, 5000, "open over IPv6");
    c.conn.send(te.encode("six"));
    await c.until(3);
    c.conn.close();
  } finally {
    v6.close();
  }
});

function haveOpenssl(): boolean {
  try {
    execFileSync("openssl", ["version"], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
}

test("TCP+TLS: `ca` and `servername` are checked; a wrong name never opens", { timeout: 20000, skip: haveOpenssl() ? false : "no openssl to make a certificate" }, async () => {
  const dir = mkdtempSync(join(tmpdir(), "ct-js-tls-"));
  try {
    execFileSync(
      "openssl",
      ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
        "-subj", "/CN=node1.clawterm.test", "-addext", "subjectAltName=DNS:node1.clawterm.test",
        "-keyout", join(dir, "key.pem"), "-out", join(dir, "cert.pem")],
      { stdio: "ignore", timeout: 10000 },
    );
    const cert = readFileSync(join(dir, "cert.pem"));
    const srv = tls.createServer({ key: readFileSync(join(dir, "key.pem")), cert }, (c) => {
      c.on("error", () => {});
      c.pipe(c);
    });
    srv.on("tlsClientError", () => {});
    await new Promise<void>((r) => srv.listen(0, "127.0.0.1", () => r()));
    const ep = `127.0.0.1:${(srv.address() as net.AddressInfo).port}`;
    try {
      const good = dial(tcpConnector({ tls: { ca: cert, servername: "node1.clawterm.test" } }), ep);
      await bounded(good.opened, 5000, "TLS open");
      good.conn.send(te.encode("secret"));
      await good.until(6);
      assert.equal(good.received().toString(), "secret");
      good.conn.close();

      const wrongName = dial(tcpConnector({ tls: { ca: cert, servername: "node2.clawterm.test" } }), ep);
      await bounded(wrongName.closed, 5000, "refused name");
      assert.equal(wrongName.rec.opened, 0);

      const noCa = dial(tcpConnector({ tls: { servername: "node1.clawterm.test" } }), ep);
      await bounded(noCa.closed, 5000, "refused certificate");
      assert.equal(noCa.rec.opened, 0);
    } finally {
      srv.close();
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("Session: ROAM to another node's address over TLS, checked against the first name", { timeout: 20000, skip: haveOpenssl() ? false : "no openssl to make a certificate" }, async () => {
  const dir = mkdtempSync(join(tmpdir(), "ct-js-roam-"));
  const servers: tls.Server[] = [];
  const conns: tls.TLSSocket[] = [];
  try {
    // A certificate for the name "localhost" only: 127.0.0.1, where ROAM sends the client,
    // is not in it.
    execFileSync(
      "openssl",
      ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
        "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
        "-keyout", join(dir, "key.pem"), "-out", join(dir, "cert.pem")],
      { stdio: "ignore", timeout: 10000 },
    );
    const key = readFileSync(join(dir, "key.pem"));
    const cert = readFileSync(join(dir, "cert.pem"));
    const roamToken = new Uint8Array(16).fill(0x55);
    const node = (onFrame: (f: { type: number; payload: Uint8Array }, send: (type: number, seq: number, p: Uint8Array) => void, c: tls.TLSSocket) => void) => {
      const srv = tls.createServer({ key, cert }, (c) => {
        conns.push(c);
        c.on("error", () => {});
        const reader = new FrameReader();
        const send = (type: number, seq: number, p: Uint8Array) => c.write(encode({ sessionId: 77, seq, type, flags: 0, payload: p }));
        c.on("data", (d) => {
          for (const f of reader.push(new Uint8Array(d))) onFrame(f, send, c);
        });
      });
      srv.on("tlsClientError", () => {});
      servers.push(srv);
      return new Promise<number>((r) => srv.listen(0, "127.0.0.1", () => r((srv.address() as net.AddressInfo).port)));
    };
    let resumeSeen: { lastSeq?: number; token?: Uint8Array } | undefined;
    const portB = await node((f, send) => {
      if (f.type === FrameType.RESUME) {
        resumeSeen = parseResume(f.payload);
        send(FrameType.RESUMED, 6, encodeResumed({ sessionId: 77, lastClientSeq: 0, firstReplaySeq: 0 }));
        send(FrameType.DATA, 7, te.encode("from B"));
      }
    });
    const portA = await node((f, send, c) => {
      if (f.type === FrameType.CONNECT) {
        send(FrameType.ACCEPT, 1, encodeAccept({ sessionId: 77, version: 1, caps: CAP_RELIABLE | 0x04, resumeToken: new Uint8Array(16).fill(1) }));
        send(FrameType.DATA, 2, te.encode("from A;"));
        const roam = new Uint8Array(1 + 4 + 2 + 16);
        roam.set([4, 127, 0, 0, 1]);
        new DataView(roam.buffer).setUint16(5, portB);
        roam.set(roamToken, 7);
        send(FrameType.ROAM, 3, roam);
        c.end();
      }
    });
    const s = Session.connect({
      url: `localhost:${portA}`,
      connector: tcpConnector({ tls: { ca: cert } }),
      tenant: 7,
      agent: 1,
      token: "ef".repeat(32),
      backoff: { baseMs: 10, capMs: 50 },
    });
    try {
      let text = "";
      const roams: string[] = [];
      const errs: Error[] = [];
      s.on("data", (b) => (text += Buffer.from(b).toString()));
      s.on("roam", (ep) => roams.push(ep));
      s.on("error", (e) => errs.push(e));
      const statuses: string[] = [];
      s.on("status", (st) => statuses.push(`${st.state} ${st.reason ?? ""}`));
      for (const t0 = Date.now(); text !== "from A;from B" && Date.now() - t0 < 10000; ) {
        await new Promise((r) => setTimeout(r, 10));
      }
      assert.equal(text, "from A;from B", `output from both nodes; statuses: ${statuses.slice(0, 4).join(" | ")}`);
      assert.deepEqual(errs, []);
      assert.deepEqual(roams, [`127.0.0.1:${portB}`]);
      assert.equal(statuses[1], `reconnecting the session moved to 127.0.0.1:${portB}`);
      assert.equal(s.stats().reconnects, 0, "a move is not a loss");
      assert.equal(resumeSeen?.lastSeq, 2);
      assert.deepEqual(resumeSeen?.token, roamToken, "RESUME at the new node carries the roam token");
      const creds = s.credentials()!;
      assert.equal(creds.endpoint, `127.0.0.1:${portB}`);
      assert.equal(creds.serverName, "localhost", "the name to check travels with the credentials");
      assert.equal(creds.resumeToken, "55".repeat(16));
    } finally {
      s.close();
    }
  } finally {
    for (const c of conns) c.destroy();
    for (const srv of servers) srv.close();
    rmSync(dir, { recursive: true, force: true });
  }
});
