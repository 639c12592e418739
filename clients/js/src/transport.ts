/**
 * Transports: how a {@link Session} reaches the server. A connector opens one connection to
 * an endpoint and reports its life through the handlers; the session asks for a new one after
 * every loss. Byte chunks in either direction are arbitrary slices of the protocol's byte
 * stream.
 */
export interface ConnHandlers {
  /** The connection is up (after its TLS / WebSocket handshake). */
  open(): void;
  /** Bytes from the server. */
  data(bytes: Uint8Array): void;
  /** The connection is gone (once, whether it ever opened or not), with why. */
  closed(reason: string): void;
}

export interface Conn {
  /** Queues bytes for the server. */
  send(bytes: Uint8Array): void;
  /** Closes the connection at once (no goodbye): the session resumes on a new one. */
  close(): void;
  /**
   * Sends what is queued, then closes: how a goodbye (SUSPEND, DISCONNECT) reaches the server.
   * Optional: without it the session uses {@link Conn.close}.
   */
  end?(): void;
}

/**
 * Opens a connection to `endpoint` (a URL for WebSocket, `HOST:PORT` for TCP). `serverName`:
 * the host the session first connected to; after a ROAM the endpoint is the new node's
 * address, and TLS certificates are still checked against this name (PROTOCOL.md §2.6).
 */
export type Connector = (endpoint: string, h: ConnHandlers, serverName?: string) => Conn;
