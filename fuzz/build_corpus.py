#!/usr/bin/env python3
"""Builds the seed corpora for the fuzz targets from tests/vectors/frames.json.

    python3 fuzz/build_corpus.py          # from the repository root (or anywhere)

Writes fuzz/corpus/<target>/ (gitignored) for every target:
* frame_decode, podlink_decode: one file per vector, plus streams of several frames / messages
  back to back;
* handshake: every frame, bad frame and incomplete frame vector (what a client may send first),
  plus the header-only refusals of PROTOCOL.md section 7.7 (wrong-size CONNECT with version 1
  and 2, empty CONNECT, CONNECT with a SESSION_ID, wrong-size RESUME, DATA first, oversize LEN);
* session, client_core: short scripts in each target's input format (see the targets) that walk
  through a session: data both ways, ACKs, loss, RESUME, take-over, overflow, agent close; the
  client scripts feed the vectors' server frames (ACCEPT, RESUMED with GAP, replayed DATA, ROAM,
  ERROR, ...) as raw bytes.
Frames over 4096 bytes (the 65535-byte DATA vector) are left out so libFuzzer keeps its default
-max_len of 4096.
"""
import json
import pathlib
import struct

FUZZ = pathlib.Path(__file__).resolve().parent
VECTORS = FUZZ.parent / "tests" / "vectors" / "frames.json"
MAX_SEED = 4096


def write(target, name, data):
    d = FUZZ / "corpus" / target
    d.mkdir(parents=True, exist_ok=True)
    (d / f"vec_{name}").write_bytes(data)


def main():
    v = json.loads(VECTORS.read_text())
    frames = []
    for sec in ("frames", "bad_frames", "incomplete_frames"):
        for e in v[sec]:
            b = bytes.fromhex(e["hex"])
            if len(b) > MAX_SEED:
                continue
            write("frame_decode", f"{sec}_{e['name']}", b)
            if sec == "frames":
                frames.append(b)
    write("frame_decode", "stream_all_frames", b"".join(frames))
    # A session's worth: frames, then a broken one, then a partial one.
    bad = bytes.fromhex(v["bad_frames"][0]["hex"])
    part = bytes.fromhex(v["incomplete_frames"][-1]["hex"])
    write("frame_decode", "stream_then_bad", b"".join(frames[:4]) + bad)
    write("frame_decode", "stream_then_partial", b"".join(frames[4:8]) + part)

    msgs = []
    for e in v["pod_messages"]:
        b = bytes.fromhex(e["hex"])
        write("podlink_decode", e["name"], b)
        msgs.append(b)
    write("podlink_decode", "stream_all_messages", b"".join(msgs))
    write("podlink_decode", "stream_then_partial", b"".join(msgs) + msgs[1][:-3])
    handshake_seeds(v)
    session_seeds(v)
    client_seeds(v)
    counts = ", ".join(
        f"{t}: {len(list((FUZZ / 'corpus' / t).iterdir()))} seeds"
        for t in ("frame_decode", "podlink_decode", "handshake", "session", "client_core")
    )
    print(counts)


def crc16_umts(data):
    crc = 0
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


def frame(sid, seq, ty, payload=b"", flags=0):
    head = bytes([0x7E]) + struct.pack(">IIBBH", sid, seq, ty, flags, len(payload))
    body = head + payload
    return body + struct.pack(">H", crc16_umts(body))


def handshake_seeds(v):
    for sec in ("frames", "bad_frames", "incomplete_frames"):
        for e in v[sec]:
            b = bytes.fromhex(e["hex"])
            if len(b) <= MAX_SEED:
                write("handshake", f"{sec}_{e['name']}", b)
    connect = bytes.fromhex(v["frames"][1]["hex"])[13:-2]  # connect_58's payload
    assert len(connect) == 58
    seeds = {
        "connect_57_v1": frame(0, 1, 0x01, connect[:57]),
        "connect_60_v2": frame(0, 1, 0x01, b"\x02" + connect[1:] + b"\0\0"),
        "connect_empty": frame(0, 1, 0x01),
        "connect_with_sid": frame(9, 1, 0x01, connect),
        "connect_bad_crc": frame(0, 1, 0x01, connect)[:-1] + b"\0",
        "connect_header_only_2000": frame(0, 1, 0x01, bytes(2000))[:13],
        "resume_5": frame(0, 1, 0x03, bytes(5)),
        "resume_24_sid_mismatch": frame(7, 1, 0x03, struct.pack(">II", 8, 3) + bytes(16)),
        "data_first": frame(0, 1, 0x10, b"ls\r"),
        "keepalive_first": frame(0, 1, 0x20),
        "oversize_len": frame(0, 1, 0x10, bytes(1500))[:13],
        "connect_then_data": frame(0, 1, 0x01, connect) + frame(5, 2, 0x10, b"x"),
    }
    for name, b in seeds.items():
        write("handshake", name, b)


# Script helpers for the session and client_core targets (their input formats).
def u8(x):
    return bytes([x & 0xFF])


def u16(x):
    return struct.pack(">H", x & 0xFFFF)


def u32(x):
    return struct.pack(">I", x & 0xFFFFFFFF)


def session_seeds(v):
    # Settings: max_payload - 1024, ring multiple, ring extra, keepalive, idle, ttl, overflow,
    # caps, first SEQ selector.
    def header(overflow=0, caps=0x03, first=2, mp=0):
        # caps | 0xF0 allows floods; mp 0: --max-payload 1024 (and --ring-bytes 1024),
        # 0xFBFF: 65535.
        return u16(mp) + u8(0) + u16(0) + u16(999) + u16(2999) + u16(9999) + u8(overflow) + \
            u8(caps) + u8(first)

    def client(kind, payload=b"", seq_off=0):
        # kind: selector for the frame type (DATA 0, ACK 6, RESIZE 9, KEEPALIVE 10, NACK 12,
        # SUSPEND 13, DISCONNECT 14); session id = the session's; SEQ = last + 1 + seq_off;
        # FLAGS 0; then the payload selector and what it reads.
        out = u8(kind) + u8(2) + u8(1) + u8(seq_off) + u8(1)
        if kind == 0:
            return out + u8(3) + u8(len(payload)) + payload  # DATA (up to 31 bytes)
        if kind == 6:
            if payload == b"":
                return out + u8(1)  # empty ACK
            return out + u8(6) + u8(1) + u8(payload[0])  # cumulative: next - n
        if kind == 9:
            return out + u8(1) + payload  # RESIZE: cols u16, rows u16
        return out + u8(1)  # empty payload

    def ack_sent(k):
        # Cumulative ACK for the k-th DATA frame sent on the connection.
        return u8(6) + u8(2) + u8(1) + u8(0) + u8(1) + u8(4) + u8(k)

    def batch(*frames):
        return u8(0) + u8(len(frames) - 1) + b"".join(frames)

    def agent(n, fill=0x41):
        return u8(5) + u8(n) + u8(fill)

    flood = lambda msgs: u8(8) + u8(0) + u8(msgs - 1) + b"".join(u16(k * 1000) for k in range(msgs))
    timer = lambda b: u8(9) + u8(b)
    resume_last = lambda back: u8(10) + u8(4) + u8(back)  # last_seq = next - 1 - back
    resume_legacy = u8(10) + u8(0)
    lost, broken, agent_close, agent_gone, shutdown, end_batch = (
        u8(11), u8(12) + u8(0), u8(13) + u8(0), u8(13) + u8(1), u8(14), u8(15))
    data_payloads = [bytes.fromhex(e["decoded"]["payload_hex"]) for e in v["frames"]
                     if e["decoded"]["type"] == "DATA" and "payload_hex" in e["decoded"]]
    resize = bytes.fromhex([e for e in v["frames"] if e["name"] == "resize"][0]["hex"])[13:-2]
    scripts = {
        "echo_and_acks": header() + batch(client(0, data_payloads[0]), client(9, resize)) +
        agent(20) + agent(5) + batch(client(6, b"\x02"), client(10)) + end_batch + timer(40),
        "loss_resume_replay": header() + agent(30) + agent(7) + lost + agent(9) +
        resume_last(2) + batch(client(6)) + timer(200),
        "legacy_resume_takeover": header(caps=0x01) + agent(10) + batch(client(6)) + agent(4) +
        resume_legacy + resume_last(0) + batch(client(13)),
        "overflow_suspended_gap": header(caps=0xF3) + lost + flood(3) + agent(50) + resume_last(200) +
        agent_close + resume_last(0),
        "pause_policy_flood": header(overflow=1, caps=0xF1) + flood(6) + batch(client(6, b"\x01")) +
        lost + timer(255) + agent_gone + resume_legacy,
        "wrapping_seq": header(first=0) + agent(10) + agent(10) + agent(10) +
        batch(client(0, data_payloads[-1], 255), client(6)) + broken + resume_last(1) +
        batch(client(14)) + shutdown,
        "timers": header() + timer(10) + timer(0) + timer(250) + timer(0) + resume_last(0) +
        timer(0) + timer(255),
    }
    # The 2026-11-30 run's finding, minimised (a bug in the target, not the session): a RESUME
    # naming a SEQ from the far future, then frames dropped while suspended, then a RESUME that
    # rightly reports GAP.
    scripts["wild_resume_then_gap"] = bytes.fromhex(
        "000000000003f6f6f6f6f6f6f6f60a0909c938380b050913880000ffffaaaae70b")
    # The two cases where the session deviated from §2.4/§2.5 until 23ab6de (the target now
    # checks both exactly). Frames dropped while suspended (2..=4 of 2..=9), a RESUME whose
    # last_seq (4) covers them, then a legacy RESUME: no GAP, they were acknowledged.
    scripts["last_seq_acks_dropped_then_legacy"] = (
        header() + agent(200) + agent(200) + lost + b"".join(agent(200, k) for k in range(6)) +
        resume_last(5) + lost + resume_legacy)
    # --max-payload 65535, attached, 5 MiB from an agent ignoring PAUSE: past the hard cap the
    # ring drops its oldest frames (SEQs 2..=17) while the client was sent them. A cumulative
    # ACK for one of them (15), then empty ACKs: the first three count the dropped 16, 17 and
    # the ring's front 18; the rest take 19, 20, 21.
    empties = lambda n: batch(*[client(6)] * n)
    scripts["cumulative_ack_then_empty_acks_after_overflow"] = (
        header(caps=0xF3, mp=0xFBFF) + flood(5) + batch(ack_sent(13)) + empties(3) +
        empties(3) + lost + resume_legacy)
    # The same overflow, a cumulative ACK for exactly the last dropped frame, then a legacy
    # RESUME: no GAP, every dropped frame was acknowledged.
    scripts["cumulative_ack_of_dropped_then_legacy"] = (
        header(caps=0xF3, mp=0xFBFF) + flood(5) + batch(ack_sent(15)) + lost + resume_legacy)
    # After the counter wrapped (first SEQ 2^32 - 2), SEQs 2^32 - 1 and 0 dropped while
    # suspended, a RESUME with last_seq 0, then a legacy RESUME: no GAP (fixed in the session
    # after the target's GAP check was made exact).
    scripts["last_seq_zero_after_wrap_then_legacy"] = (
        header(first=0) + u8(1) + lost + b"".join(agent(200, k) for k in range(7)) +
        resume_last(5) + lost + resume_legacy)
    for name, b in scripts.items():
        write("session", name, b)


def client_seeds(v):
    vec = {e["name"]: bytes.fromhex(e["hex"]) for e in v["frames"]}
    raw = lambda b: u8(5) + u8(0) + u8(len(b)) + b
    send = lambda n: u8(6) + u8(n) + u8(0x61)
    tick = lambda b: u8(8) + u8(b)
    reconnect = u8(9) + u8(0)
    lost = u8(11) + u8(1)
    accept = vec["accept"]
    scripts = {
        "connect_accept_data": u8(0) + send(5) + raw(accept) + raw(vec["data_replay"]) +
        raw(vec["data_contains_flag_bytes"]) + raw(vec["ack_cumulative"]) + tick(30) +
        raw(vec["keepalive_s1_q1"]) + raw(vec["disconnect"]),
        "resume_gap_replay": u8(0) + raw(accept) + send(3) + lost + reconnect +
        raw(vec["resumed_gap"]) + raw(vec["data_replay"]) + raw(vec["seq_max"]) +
        raw(vec["roam_v4"]) + reconnect + raw(vec["error_no_such_session"]),
        "saved_credentials": u8(1) + u32(0x9A3F0002) + u8(0xF0) + u32(17) + u32(40) +
        raw(vec["resumed_gap"]) + raw(vec["data_replay"]) + tick(255) + reconnect +
        raw(vec["resumed_gap"]),
        "wrong_first_frame": u8(0) + raw(vec["data_replay"]) + reconnect + raw(vec["resume_24"]),
    }
    for name, b in scripts.items():
        write("client_core", name, b)


if __name__ == "__main__":
    main()
