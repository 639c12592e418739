/**
 * The TCP transport for Node: plaintext, or TLS 1.3 (`tls: { ca, servername, … }`, Node's
 * `tls.connect` options). Endpoints are `HOST:PORT` (IPv6 as `[ADDR]:PORT`). Node-only: the
 * browser bundle never imports this file.
 */
import net from "node:net";
import tls from "node:tls";
import type { Conn, ConnHandlers, Connector } from "./transport.js";

export interface TcpOptions {
  /**
   * TLS options (`ca`, `servername`, `rejectUnauthorized`, …); none: plaintext. Without
   * `servername` the certificate is checked against the host the session first connected to
   * (also after a ROAM to an address).
   */
  tls?: tls.ConnectionOptions;
}

export function splitHostPort(endpoint: string): [string, number] {
  const m = /^\[(.+)\]:(\d+)$/.exec(endpoint) ?? /^([^:]+):(\d+)$/.exec(endpoint);
  if (!m) throw new Error(`endpoint must be HOST:PORT, got ${endpoint}`);
  return [m[1], Number(m[2])];
}

export function tcpConnector(opts: TcpOptions = {}): Connector {
  return (endpoint: string, h: ConnHandlers, serverName?: string): Conn => {
    const [host, port] = splitHostPort(endpoint);
    const name = opts.tls?.servername ?? serverName ?? host;
    let done = false;
    const finish = (why: string) => {
      if (done) return;
      done = true;
      h.closed(why);
    };
    const sock: net.Socket = opts.tls
      ? tls.connect(
          {
            host,
            port,
            minVersion: "TLSv1.3",
            // SNI for a DNS name only; the certificate is checked against the name either way.
            servername: net.isIP(name) ? undefined : name,
            checkServerIdentity: (_host, cert) => tls.checkServerIdentity(name, cert),
            ...opts.tls,
          },
          () => {
            if (!done) h.open();
          },
        )
      : net.connect({ host, port }, () => {
          if (!done) h.open();
        });
    sock.setNoDelay(true);
    sock.on("data", (b: Buffer) => {
      if (!done) h.data(new Uint8Array(b.buffer, b.byteOffset, b.byteLength));
    });
    sock.on("error", (e) => finish(e.message));
    sock.on("close", () => finish("connection closed"));
    sock.on("end", () => finish("the server closed the connection"));
    return {
      send(bytes: Uint8Array) {
        if (!done) sock.write(bytes);
      },
      close() {
        finish("closed by the client");
        sock.destroy();
      },
      end() {
        // What was written goes out, then FIN (destroy() would drop a DISCONNECT queued behind
        // unsent input); the socket reads on until the server closes, at most 30 s.
        finish("closed by the client");
        sock.end();
        const t = setTimeout(() => sock.destroy(), 30000);
        t.unref();
        sock.once("close", () => clearTimeout(t));
      },
    };
  };
}
