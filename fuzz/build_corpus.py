#!/usr/bin/env python3
"""Builds the seed corpora for the fuzz targets from tests/vectors/frames.json.

    python3 fuzz/build_corpus.py          # from the repository root (or anywhere)

Writes fuzz/corpus/frame_decode/ and fuzz/corpus/podlink_decode/ (both gitignored): one file per
vector, plus streams of several frames / messages back to back. Frames over 4096 bytes (the
65535-byte DATA vector) are left out so libFuzzer keeps its default -max_len of 4096.
"""
import json
import pathlib

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
    n1 = len(list((FUZZ / "corpus" / "frame_decode").iterdir()))
    n2 = len(list((FUZZ / "corpus" / "podlink_decode").iterdir()))
    print(f"frame_decode: {n1} seeds, podlink_decode: {n2} seeds")


if __name__ == "__main__":
    main()
