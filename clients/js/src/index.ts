/**
 * `@clawterm/client`: the ClawTerm client library for Node and the browser (issue 16).
 * This first part is the frame codec, tested against every vector of the project
 * (tests/vectors/frames.json); sessions (RELIABLE resend, exact replay, auto-resume) and the
 * WebSocket and TCP/TLS transports build on it.
 */
export * from "./crc16.js";
export * from "./frame.js";
export * from "./payload.js";
