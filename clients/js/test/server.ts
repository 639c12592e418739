// Test helpers: a real clawtermd (plaintext, TCP and WebSocket ports on free ports) with a
// real `claw-agent echo` pod, and a TCP proxy that can be cut. Binaries: $CLAWTERM_BIN_DIR or
// the workspace's target/debug.
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, mkdirSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
// dist/test → clients/js → repo
const repo = resolve(here, "../../../..");
export const bins = process.env.CLAWTERM_BIN_DIR ?? join(repo, "target/debug");
export const TOKEN = "ab".repeat(32);
export const TENANT = 7;
export const AGENT = 1;

function cleanEnv(): NodeJS.ProcessEnv {
  const e = { ...process.env };
  for (const k of Object.keys(e)) if (k.startsWith("CLAWTERM")) delete e[k];
  return e;
}

export interface Server {
  tcp: string;
  ws: string;
  stop(): void;
}

export async function startServer(extra: string[] = []): Promise<Server> {
  const dir = mkdtempSync(join(tmpdir(), "ct-js-"));
  const sock = join(dir, "sock");
  mkdirSync(sock);
  writeFileSync(join(dir, "tokens"), `${TENANT} ${TOKEN}\n`);
  const agent = spawn(join(bins, "claw-agent"), ["-s", sock, "--tenant", String(TENANT), "--agent", String(AGENT), "echo"], {
    env: { ...cleanEnv(), RUST_LOG: "warn" },
    stdio: ["ignore", "pipe", "ignore"],
  });
  const kill = (c: ChildProcess) => {
    try {
      c.kill("SIGKILL");
    } catch {
      // gone
    }
  };
  await new Promise<void>((res, rej) => {
    let out = "";
    const t = setTimeout(() => rej(new Error("claw-agent never listened")), 10000);
    agent.stdout!.on("data", (d) => {
      out += d;
      if (out.includes("listening on")) {
        clearTimeout(t);
        res();
      }
    });
    agent.on("exit", (c) => rej(new Error(`claw-agent exited ${c}`)));
  });
  const server = spawn(
    join(bins, "clawtermd"),
    ["--bind", "127.0.0.1", "--port", "0", "--insecure-plaintext", "--tokens", join(dir, "tokens"), "--socket-dir", sock,
      "--admin", "off", "--no-quic", "--shards", "2", ...extra],
    { env: { ...cleanEnv(), RUST_LOG: "info" }, stdio: ["ignore", "ignore", "pipe"] },
  );
  const [tcp, ws] = await new Promise<[string, string]>((res, rej) => {
    let err = "";
    const t = setTimeout(() => rej(new Error(`clawtermd never listened: ${err}`)), 10000);
    server.stderr!.on("data", (d) => {
      err += d;
      const m = /listening on tcp (\S+) .*websocket (\S+?),/.exec(err);
      if (m) {
        clearTimeout(t);
        res([m[1], m[2]]);
      }
    });
    server.on("exit", (c) => rej(new Error(`clawtermd exited ${c}: ${err}`)));
  });
  return {
    tcp,
    ws,
    stop() {
      kill(server);
      kill(agent);
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** A TCP proxy to `target` whose connections can be cut and which can refuse new ones. */
export async function startProxy(target: string) {
  const [host, port] = target.split(":");
  const socks = new Set<net.Socket>();
  let down = false;
  let stalled = false;
  const srv = net.createServer((c) => {
    if (down) {
      c.destroy();
      return;
    }
    const u = net.connect(Number(port), host);
    socks.add(c);
    socks.add(u);
    c.on("data", (d) => u.write(d));
    // Stalled: what the server sends is held here (lost if the connection is then cut), as
    // a network that stopped delivering would.
    u.on("data", (d) => {
      if (!stalled) c.write(d);
    });
    const end = () => {
      c.destroy();
      u.destroy();
      socks.delete(c);
      socks.delete(u);
    };
    for (const s of [c, u]) {
      s.on("error", end);
      s.on("close", end);
    }
  });
  await new Promise<void>((r) => srv.listen(0, "127.0.0.1", () => r()));
  const addr = srv.address() as net.AddressInfo;
  return {
    addr: `127.0.0.1:${addr.port}`,
    cut() {
      for (const s of socks) s.resetAndDestroy();
      socks.clear();
    },
    setDown(v: boolean) {
      down = v;
    },
    /** Stops (or restarts) delivering the server's bytes to the client. */
    setStalled(v: boolean) {
      stalled = v;
    },
    close() {
      for (const s of socks) s.destroy();
      srv.close();
    },
  };
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export async function waitFor<T>(what: string, cond: () => T | Promise<T>, ms = 10000): Promise<T> {
  const t0 = Date.now();
  for (;;) {
    const v = await cond();
    if (v) return v;
    if (Date.now() - t0 > ms) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
}
