/**
 * `@clawterm/client`: the ClawTerm client library for Node and the browser (issue 16).
 * So far: the frame codec, tested against every vector of the project
 * (tests/vectors/frames.json), and a frame reader for chunked streams; sessions (RELIABLE
 * resend, exact replay, auto-resume) and the WebSocket and TCP/TLS transports build on them.
 */
export * from "./crc16.js";
export * from "./frame.js";
export * from "./payload.js";
export * from "./reader.js";
