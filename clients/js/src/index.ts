/**
 * `@clawterm/client`: the ClawTerm client library for Node and the browser — the frame codec
 * (tested against every vector of the project), a frame reader for chunked streams, the
 * sans-IO session core, and {@link Session}: RELIABLE resend, exact replay, auto-resume and
 * take-over over WebSocket (browser and Node) or TCP/TLS (Node: import `tcpConnector` from
 * `@clawterm/client/tcp`).
 */
export * from "./crc16.js";
export * from "./frame.js";
export * from "./payload.js";
export * from "./reader.js";
export * from "./core.js";
export * from "./transport.js";
export * from "./websocket.js";
export * from "./session.js";
