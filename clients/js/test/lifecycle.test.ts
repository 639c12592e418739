// A Session's life against the real clawtermd and echo pod over TCP (session.test.ts has the
// transport matrix): close() ends the session on the server even with input still queued,
// detach() keeps it and output made while away is replayed exactly, credentials survive JSON,
// input written while the network is down arrives once, refusals are typed ServerErrors that
// end the session without a retry loop, and a connector that cannot exist is an error, not a
// crash.
import { test } from "node:test";
import assert from "node:assert/strict";
import net from "node:net";
import { ErrorCode, ServerError, Session, webSocketConnector, type Credentials } from "../src/index.js";
import { splitHostPort, tcpConnector } from "../src/tcp.js";
import { AGENT, TENANT, TOKEN, sleep, startProxy, startServer, waitFor } from "./server.js";

function collect(s: Session) {
  const got: Buffer[] = [];
  s.on("data", (b) => got.push(Buffer.from(b)));
  return { text: () => Buffer.concat(got).toString(), length: () => got.reduce((a, b) => a + b.length, 0) };
}

/** A proxy for one connection that forwards half-closes and tells when the server closed. */
async function halfCloseProxy(target: string) {
  const [host, port] = splitHostPort(target);
  const socks: net.Socket[] = [];
  let upstreamClosed = false;
  const srv = net.createServer({ allowHalfOpen: true }, (c) => {
    const u = net.connect({ port, host, allowHalfOpen: true });
    socks.push(c, u);
    c.pipe(u); // the client's FIN is passed on after its bytes
    u.pipe(c);
    c.on("error", () => u.destroy());
    u.on("error", () => c.destroy());
    u.on("close", () => {
      upstreamClosed = true;
      c.destroy();
    });
  });
  await new Promise<void>((r) => srv.listen(0, "127.0.0.1", () => r()));
  return {
    addr: `127.0.0.1:${(srv.address() as net.AddressInfo).port}`,
    upstreamClosed: () => upstreamClosed,
    close() {
      for (const s of socks) s.destroy();
      srv.close();
    },
  };
}

function errors(s: Session) {
  const errs: Error[] = [];
  s.on("error", (e) => errs.push(e));
  return errs;
}

test("a Session's life against the real server", { timeout: 120000 }, async (t) => {
  const srv = await startServer();
  // Every session ends with the test, passed or failed (a reconnecting one would keep the
  // process alive).
  const sessions: Session[] = [];
  const track = (s: Session) => (sessions.push(s), s);
  t.after(() => {
    for (const s of sessions) s.close();
    srv.stop();
  });
  const tcp = tcpConnector();

  await t.test("close() ends the session on the server, even behind a backlog of input", async () => {
    for (let i = 0; i < 2; i++) {
      const proxy = await halfCloseProxy(srv.tcp);
      try {
        const s = track(Session.connect({ url: proxy.addr, connector: tcp, tenant: TENANT, agent: AGENT, token: TOKEN }));
        await waitFor("connected", () => s.status === "connected");
        s.write("q".repeat(4 << 20)); // the DISCONNECT queues behind 4 MiB
        const creds = s.credentials()!;
        const closed: string[] = [];
        s.on("close", (r) => closed.push(r));
        s.close();
        assert.equal(s.status, "closed");
        assert.deepEqual(closed, ["closed by the client"]);
        // The server closes its side once it has read everything (a RESUME arriving before
        // that would take the session over, and the DISCONNECT would never count).
        await waitFor("the server's close", () => proxy.upstreamClosed(), 30000);
        const r = track(Session.resume(creds, { url: srv.tcp, connector: tcp }));
        const errs = errors(r);
        await waitFor("the refusal", () => r.status === "closed" || r.status === "connected", 10000);
        assert.equal(r.status, "closed", `round ${i}: the session was still there after close()`);
        assert.ok(errs[0] instanceof ServerError);
        const e = errs[0] as ServerError;
        assert.equal(e.code, ErrorCode.NO_SUCH_SESSION);
        assert.equal(e.codeName, "NO_SUCH_SESSION");
        assert.ok(e.fatal);
      } finally {
        proxy.close();
      }
    }
  });

  await t.test("detach() keeps the session; what the agent wrote meanwhile is replayed exactly", async () => {
    const a = track(Session.connect({ url: srv.tcp, connector: tcp, tenant: TENANT, agent: AGENT, token: TOKEN }));
    const outA = collect(a);
    await waitFor("connected", () => a.status === "connected");
    let want = "";
    for (let i = 0; i < 2000; i++) want += `line ${i}\n`;
    a.write(want);
    await waitFor("some echo", () => outA.length() > 0);
    // JSON, as a tab keeps it across a reload.
    a.detach();
    assert.equal(a.status, "closed");
    const saved = JSON.parse(JSON.stringify(a.credentials())) as Credentials;
    assert.equal(saved.lastSeq, a.credentials()!.lastSeq);
    const had = outA.text();
    await sleep(300); // the echo goes on into the ring
    const b = track(Session.resume(saved, { connector: tcp }));
    const outB = collect(b);
    await waitFor("everything", () => had.length + outB.length() >= want.length, 15000);
    assert.equal(had + outB.text(), want, "every byte once, in order, across detach and resume");
    b.close();
  });

  await t.test("input written while the network is down arrives once after the resume", async () => {
    const proxy = await startProxy(srv.tcp);
    try {
      const s = track(Session.connect({ url: proxy.addr, connector: tcp, tenant: TENANT, agent: AGENT, token: TOKEN, backoff: { baseMs: 50, capMs: 200 } }));
      const out = collect(s);
      const statuses: string[] = [];
      s.on("status", (st) => statuses.push(st.state));
      await waitFor("connected", () => s.status === "connected");
      s.write("before;");
      await waitFor("echo", () => out.text() === "before;");
      proxy.setDown(true);
      proxy.cut();
      await waitFor("reconnecting", () => s.status === "reconnecting");
      s.write("while-down-1;");
      s.write("while-down-2;");
      await sleep(300);
      proxy.setDown(false);
      await waitFor("echo after resume", () => out.text().length >= "before;while-down-1;while-down-2;".length, 10000);
      await sleep(200);
      assert.equal(out.text(), "before;while-down-1;while-down-2;");
      assert.ok(statuses.includes("reconnecting") && statuses.at(-1) === "connected", statuses.join(","));
      s.close();
    } finally {
      proxy.close();
    }
  });

  await t.test("a wrong token is a typed, final refusal (no retry loop)", async () => {
    const s = track(Session.connect({ url: srv.tcp, connector: tcp, tenant: TENANT, agent: AGENT, token: "00".repeat(32), backoff: { baseMs: 10, capMs: 20 } }));
    const errs = errors(s);
    const reasons: string[] = [];
    s.on("close", (r) => reasons.push(r));
    await waitFor("closed", () => s.status === "closed");
    await sleep(200);
    assert.equal(errs.length, 1, "one error, no reconnects");
    assert.ok(errs[0] instanceof ServerError);
    assert.equal((errs[0] as ServerError).code, ErrorCode.AUTH_FAILED);
    assert.equal(s.stats().reconnects, 0);
    assert.equal(reasons.length, 1);
    assert.match(reasons[0], /AUTH_FAILED/);
    assert.equal(s.credentials(), null, "no session, no credentials");
  });

  await t.test("an agent nobody serves is NO_AGENT, final for a new session", async () => {
    const s = track(Session.connect({ url: srv.tcp, connector: tcp, tenant: TENANT, agent: AGENT + 41, token: TOKEN }));
    const errs = errors(s);
    await waitFor("closed", () => s.status === "closed");
    assert.equal((errs[0] as ServerError).code, ErrorCode.NO_AGENT);
  });

  await t.test("no WebSocket class is an error event and a closed session, not a crash", async () => {
    const noWs = webSocketConnector({ WebSocket: undefined });
    const saved = (globalThis as { WebSocket?: unknown }).WebSocket;
    (globalThis as { WebSocket?: unknown }).WebSocket = undefined;
    try {
      const s = track(Session.connect({ url: `ws://${srv.ws}/ws`, connector: noWs, tenant: TENANT, agent: AGENT, token: TOKEN }));
      const errs = errors(s);
      await waitFor("closed", () => s.status === "closed", 2000);
      assert.match(errs[0].message, /WebSocket/);
    } finally {
      (globalThis as { WebSocket?: unknown }).WebSocket = saved;
    }
  });
});
