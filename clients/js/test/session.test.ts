// @clawterm/client's Session against the real clawtermd and echo pod, over TCP and over
// WebSocket (the `ws` package): connect and echo, abrupt loss with exact replay, take-over,
// GAP, a session moving between TCP and WebSocket, and a server that sends garbage.
import { test } from "node:test";
import assert from "node:assert/strict";
import net from "node:net";
import { WebSocket } from "ws";
import { Session, webSocketConnector, type Connector, encode, FrameType } from "../src/index.js";
import { tcpConnector } from "../src/tcp.js";
import { AGENT, TENANT, TOKEN, sleep, startProxy, startServer, waitFor } from "./server.js";

const wsConnector = webSocketConnector({ WebSocket: WebSocket as never });

/** Collects a session's output as text. */
function collect(s: Session) {
  const got: string[] = [];
  s.on("data", (b) => got.push(Buffer.from(b).toString()));
  return { text: () => got.join("") };
}

const transports: [string, (srv: { tcp: string; ws: string }) => { url: string; connector: Connector }][] = [
  ["tcp", (srv) => ({ url: srv.tcp, connector: tcpConnector() })],
  ["websocket", (srv) => ({ url: `ws://${srv.ws}/ws`, connector: wsConnector })],
];

test("sessions against the real server", { timeout: 120000 }, async (t) => {
  const srv = await startServer(["--ring-bytes", "65536", "--overflow", "drop"]);
  t.after(() => srv.stop());

  for (const [name, via] of transports) {
    await t.test(`${name}: connect and echo`, async () => {
      const s = Session.connect({ ...via(srv), tenant: TENANT, agent: AGENT, token: TOKEN });
      const out = collect(s);
      await waitFor("connected", () => s.status === "connected");
      s.write("hello over " + name);
      await waitFor("the echo", () => out.text() === "hello over " + name);
      assert.ok(s.credentials()!.sessionId > 0);
      s.close();
    });

    await t.test(`${name}: abrupt loss mid-output, exact replay`, async () => {
      const proxy = await startProxy(name === "tcp" ? srv.tcp : srv.ws);
      const url = name === "tcp" ? proxy.addr : `ws://${proxy.addr}/ws`;
      const s = Session.connect({ url, connector: via(srv).connector, tenant: TENANT, agent: AGENT, token: TOKEN, backoff: { baseMs: 20, capMs: 100 } });
      const out = collect(s);
      await waitFor("connected", () => s.status === "connected");
      let want = "";
      for (let i = 0; i < 400; i++) {
        const line = `${name}-${i}-${"x".repeat(i % 50)}\n`;
        want += line;
        s.write(line);
        if (i === 100 || i === 250) proxy.cut();
        if (i % 50 === 0) await sleep(5);
      }
      await waitFor("every echo", () => out.text().length >= want.length, 20000);
      assert.equal(out.text(), want, "every byte once, in order");
      assert.ok(s.stats().reconnects >= 1, "the connection was cut");
      s.close();
      proxy.close();
    });

    await t.test(`${name}: a second client takes the session over`, async () => {
      const a = Session.connect({ ...via(srv), tenant: TENANT, agent: AGENT, token: TOKEN });
      await waitFor("connected", () => a.status === "connected");
      let takenOver = false;
      a.on("takeover", () => (takenOver = true));
      const b = Session.resume(a.credentials()!, via(srv));
      const out = collect(b);
      await waitFor("b connected", () => b.status === "connected");
      await waitFor("a told", () => takenOver);
      assert.equal(a.status, "closed");
      b.write("mine now");
      await waitFor("b's echo", () => out.text() === "mine now");
      b.close();
    });
  }

  await t.test("a session moves between TCP and WebSocket with exact replay", async () => {
    const a = Session.connect({ url: srv.tcp, connector: tcpConnector(), tenant: TENANT, agent: AGENT, token: TOKEN });
    const outA = collect(a);
    await waitFor("connected", () => a.status === "connected");
    a.write("over tcp;");
    await waitFor("echo", () => outA.text() === "over tcp;");
    a.detach();
    const b = Session.resume(a.credentials()!, { url: `ws://${srv.ws}/ws`, connector: wsConnector });
    const outB = collect(b);
    await waitFor("b connected", () => b.status === "connected");
    b.write("over websocket;");
    await waitFor("echo", () => outB.text() === "over websocket;", 5000);
    b.close();
  });

  await t.test("GAP: output dropped from the ring while away is reported", async () => {
    const proxy = await startProxy(srv.tcp);
    const s = Session.connect({ url: proxy.addr, connector: tcpConnector(), tenant: TENANT, agent: AGENT, token: TOKEN, backoff: { baseMs: 2000, capMs: 2000 } });
    const out = collect(s);
    let gaps = 0;
    s.on("gap", () => gaps++);
    await waitFor("connected", () => s.status === "connected");
    // 200 KiB of input echoed while nothing reaches the client (no ACK comes back): more
    // than the 64 KiB ring, which drops the oldest (--overflow drop).
    proxy.setStalled(true);
    s.write("y".repeat(200 * 1024));
    await sleep(500);
    proxy.cut();
    proxy.setStalled(false);
    await waitFor("the resume", () => gaps > 0, 15000);
    assert.ok(out.text().length < 200 * 1024, "some output was lost, as the GAP says");
    s.close();
    proxy.close();
  });

  await t.test("bad server input is an error, never a hang or a crash", async () => {
    for (const evil of [
      Buffer.from("garbage, not frames\r\n"),
      (() => {
        const f = Buffer.from(encode({ sessionId: 1, seq: 1, type: FrameType.ACCEPT, flags: 0, payload: new Uint8Array(22) }));
        f[f.length - 1] ^= 0xff; // bad CRC
        return f;
      })(),
      Buffer.from([0x7e, 0, 0, 0, 1, 0, 0, 0, 1, 0x10, 0, 0xff, 0xff]), // LEN over the limit (our 64 KiB is the max; this one is exactly it, then no body)
      Buffer.from(encode({ sessionId: 1, seq: 1, type: FrameType.RESUMED, flags: 0, payload: new Uint8Array(12) })), // RESUMED to a CONNECT
    ]) {
      const fake = net.createServer((c) => {
        c.on("data", () => c.write(evil));
        c.on("error", () => {});
      });
      await new Promise<void>((r) => fake.listen(0, "127.0.0.1", () => r()));
      const port = (fake.address() as net.AddressInfo).port;
      const s = Session.connect({ url: `127.0.0.1:${port}`, connector: tcpConnector(), tenant: TENANT, agent: AGENT, token: TOKEN, backoff: { baseMs: 50, capMs: 100 }, connectTimeoutMs: 1000 });
      const errors: Error[] = [];
      s.on("error", (e) => errors.push(e));
      const t0 = Date.now();
      await waitFor("an error or a timeout", () => errors.length > 0 || Date.now() - t0 > 1500, 5000);
      s.close();
      fake.close();
      if (evil[0] === 0x7e && evil.length === 13) continue; // a partial frame: the connect timeout ends it
      assert.ok(errors.length > 0, `no error for ${evil.toString("hex").slice(0, 40)}`);
    }
  });
});
