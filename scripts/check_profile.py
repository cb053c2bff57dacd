#!/usr/bin/env python3
"""Checks what `phatgoose profile` wrote, without third-party packages.

    check_profile.py trace TRACE.json          valid Chrome trace-event JSON (JSON Object Format) that Perfetto opens
    check_profile.py png SCREENSHOT.png W H    a real rendering: expected size, not blank, varied colours
    check_profile.py html REPORT.html          self-contained, with every plot section
    check_profile.py run RESULT.json clean     a load test (--format json) with no error, rejection or unfinished
                                               request, and flat memory
    check_profile.py run RESULT.json overloaded  an overloaded load test that reported rejections, no errors, and
                                               kept its memory and backlog flat instead of queueing

Exit 0 when every check passes; otherwise one line per failure on stderr and exit 1.
"""
import json
import struct
import sys
import zlib

SECTIONS = ["heatmap", "latency-histogram", "latency-cdf", "worker-timeline", "worker-utilisation",
            "phase-breakdown", "imbalanced-layers", "co-selection"]


def fail(errors):
    for e in errors:
        print("check_profile: " + e, file=sys.stderr)
    return 1 if errors else 0


def check_trace(path):
    errors = []
    with open(path, "rb") as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or not isinstance(doc.get("traceEvents"), list):
        return fail([f"{path}: expected an object with a traceEvents array"])
    events = doc["traceEvents"]
    kinds = {}
    spans = {}
    named_threads = set()
    for i, e in enumerate(events):
        ph = e.get("ph")
        if ph not in ("X", "M", "C"):
            errors.append(f"{path}: event {i}: unexpected ph {ph!r}")
            continue
        for field in ("name", "pid", "tid") + (("ts",) if ph != "M" else ()):
            if field not in e:
                errors.append(f"{path}: event {i} ({ph}): missing {field}")
        if not isinstance(e.get("pid"), int) or not isinstance(e.get("tid"), int):
            errors.append(f"{path}: event {i}: pid and tid must be integers")
        if ph == "M":
            if e["name"] == "thread_name":
                named_threads.add((e["pid"], e["tid"]))
            continue
        if not isinstance(e["ts"], (int, float)) or e["ts"] < 0:
            errors.append(f"{path}: event {i}: ts must be a number >= 0")
        if ph == "X":
            if not isinstance(e.get("dur"), (int, float)) or e["dur"] < 0:
                errors.append(f"{path}: event {i}: dur must be a number >= 0")
                continue
            kinds[e.get("cat")] = kinds.get(e.get("cat"), 0) + 1
            spans.setdefault((e["pid"], e["tid"]), []).append((e["ts"], e["ts"] + e["dur"], e["name"]))
        if ph == "C":
            args = e.get("args")
            if not isinstance(args, dict) or not args or not all(isinstance(v, (int, float)) for v in args.values()):
                errors.append(f"{path}: event {i}: a counter needs numeric args")
            kinds["counter"] = kinds.get("counter", 0) + 1
        if len(errors) > 20:
            break
    # Spans on one thread must nest (Perfetto draws them as a stack); allow 1 us for rounding.
    for key, list_ in spans.items():
        list_.sort(key=lambda s: (s[0], -s[1]))
        stack = []
        for start, end, name in list_:
            while stack and stack[-1] <= start + 0.001:
                stack.pop()
            if stack and end > stack[-1] + 1.0:
                errors.append(f"{path}: thread {key}: span {name!r} at {start} us overlaps its enclosing span without nesting")
                break
            stack.append(end)
        if key not in named_threads:
            errors.append(f"{path}: thread {key} has spans but no thread_name metadata")
    for needed in ("routing", "plan", "item", "combine", "call", "queue", "wait", "counter"):
        if kinds.get(needed, 0) == 0:
            errors.append(f"{path}: expected {needed} events, found none")
    if "dropped_events" not in doc.get("otherData", {}):
        errors.append(f"{path}: otherData.dropped_events missing")
    if not errors:
        print(f"check_profile: {path}: valid Chrome trace, {len(events)} events: " +
              ", ".join(f"{k} {v}" for k, v in sorted(kinds.items(), key=lambda kv: str(kv[0]))))
    return fail(errors)


def read_png(path):
    """Decodes an 8-bit, non-interlaced greyscale/RGB/RGBA PNG into (width, height, channels, rows)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = header
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(colour)
    if depth != 8 or channels is None or interlace != 0:
        raise ValueError(f"unsupported PNG (depth {depth}, colour type {colour}, interlace {interlace})")
    raw = zlib.decompress(idat)
    stride = width * channels
    rows, previous = [], bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - channels] if x >= channels else 0
            b = previous[x]
            c = previous[x - channels] if x >= channels else 0
            if kind == 1:
                line[x] = (line[x] + a) & 255
            elif kind == 2:
                line[x] = (line[x] + b) & 255
            elif kind == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        previous = line
    return width, height, channels, rows


def check_png(path, width, height):
    errors = []
    w, h, channels, rows = read_png(path)
    if (w, h) != (width, height):
        errors.append(f"{path}: expected {width}x{height}, found {w}x{h}")
    total, non_white, colours, luma_sum, luma_sq = 0, 0, set(), 0.0, 0.0
    for y in range(0, h, 2):
        row = rows[y]
        for x in range(0, w, 2):
            px = row[x * channels:(x + 1) * channels]
            rgb = tuple(px[:3]) if channels >= 3 else (px[0],) * 3
            total += 1
            if min(rgb) < 245:
                non_white += 1
            colours.add((rgb[0] >> 3, rgb[1] >> 3, rgb[2] >> 3))
            luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
            luma_sum += luma
            luma_sq += luma * luma
    mean = luma_sum / total
    variance = luma_sq / total - mean * mean
    ink = non_white / total
    if ink < 0.05:
        errors.append(f"{path}: looks blank: only {ink:.1%} of pixels are not white")
    if len(colours) < 40:
        errors.append(f"{path}: only {len(colours)} distinct colours: the plots did not render")
    if variance < 200:
        errors.append(f"{path}: pixel variance {variance:.0f} is too low for a page of plots")
    if not errors:
        print(f"check_profile: {path}: {w}x{h}, {ink:.1%} ink, {len(colours)} colours, luma variance {variance:.0f}")
    return fail(errors)


def check_html(path):
    errors = []
    with open(path, encoding="utf-8") as f:
        html = f.read()
    for section in SECTIONS:
        if f'<svg id="{section}"' not in html:
            errors.append(f"{path}: expected an <svg id=\"{section}\">, found none")
    for external in ("<script src", "<link ", "http://", "https://"):
        if external in html.replace('xmlns="http://www.w3.org/2000/svg"', ""):
            errors.append(f"{path}: not self-contained: found {external!r}")
    if not errors:
        print(f"check_profile: {path}: self-contained, {len(SECTIONS)} plot sections, {len(html)} bytes")
    return fail(errors)


def check_run(path, expect):
    errors = []
    with open(path) as f:
        r = json.load(f)
    mib = 1 << 20
    growth = r["rss_end_bytes"] - r["rss_start_bytes"]
    timeline = r.get("timeline", [])
    rss = [p["rss_bytes"] for p in timeline if p.get("rss_bytes")]
    third = max(1, len(rss) // 3)
    drift = (sum(rss[-third:]) / third - sum(rss[:third]) / third) if rss else 0
    if r["failed"] != 0:
        errors.append(f"{path}: expected no failed requests, found {r['failed']} (first: {r.get('first_error')})")
    if r["completed"] <= 0:
        errors.append(f"{path}: expected completed requests, found none")
    if growth > 64 * mib or drift > 32 * mib:
        errors.append(f"{path}: expected flat memory, found RSS {r['rss_start_bytes'] // mib} -> {r['rss_end_bytes'] // mib} MiB "
                      f"(first to last third of the window: {drift / mib:+.1f} MiB)")
    if expect == "clean":
        for field in ("rejected", "unfinished"):
            if r[field] != 0:
                errors.append(f"{path}: expected no {field} requests, found {r[field]}")
    else:
        if r["rejected"] <= 0 or r["runtime_rejected_calls"] <= 0:
            errors.append(f"{path}: expected rejections under overload, found {r['rejected']} requests, {r['runtime_rejected_calls']} calls")
        backlog = max([p["backlog"] for p in timeline] or [0])
        if backlog > 10 * max(1, r.get("max_concurrency") or 1):
            errors.append(f"{path}: expected the backlog to stay bounded, found {backlog} arrivals waiting")
    if not errors:
        print(f"check_profile: {path}: {r['mode']} loop, {r['completed']} completed, {r['rejected']} rejected "
              f"({r['runtime_rejected_calls']} calls), {r['failed']} failed, {r['request_throughput']:.2f} req/s, "
              f"p99 {r['p99_e2el_ms']:.1f} ms, RSS {r['rss_start_bytes'] / mib:.1f} -> {r['rss_end_bytes'] / mib:.1f} MiB")
    return fail(errors)


def main(argv):
    if len(argv) >= 3 and argv[1] == "trace":
        return check_trace(argv[2])
    if len(argv) == 5 and argv[1] == "png":
        return check_png(argv[2], int(argv[3]), int(argv[4]))
    if len(argv) >= 3 and argv[1] == "html":
        return check_html(argv[2])
    if len(argv) == 4 and argv[1] == "run" and argv[3] in ("clean", "overloaded"):
        return check_run(argv[2], argv[3])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
