#!/usr/bin/env python3
"""Summaries, PASS/FAIL lines and the join chart for benches/*.sh (Python standard library).

  report.py join  --csv FILE --openssl VERIFY_PER_SEC [--svg FILE]
  report.py soak  --csv FILE --connections N
  report.py media WITHOUT.json WITH.json

The CSV files are what `spacegate-load scale --csv` writes: one row per measurement,
`kind` saying which (churn, stage, hold, sample, soak, release).
"""

import argparse
import csv
import html
import json
import math
import sys

# Issue 10's thresholds.
MAX_COST_SPREAD = 1.15  # largest CPU per join ÷ smallest, across population phases
MIN_RSA_RATIO = 0.30  # joins/s per server core ÷ openssl rsa2048 verify/s
P99_TARGET_MS = {10: 5.0, 100: 30.0, 1000: 100.0}
MAX_BYTES_PER_IDLE = 4096
MAX_RSS_DRIFT = 0.02
MAX_IDLE_CPU_SHARE = 0.02
REFERENCE_CONCURRENCY = 100


def num(row, key):
    """A numeric field of a CSV row, or None when empty."""
    v = row.get(key, "")
    try:
        return float(v) if v not in ("", None) else None
    except ValueError:
        return None


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def verdict(label, value, limit, unit="", at_most=True):
    """Prints a PASS/FAIL line; a missing value is a FAIL, never a silent pass."""
    if value is None:
        print(f"FAIL  {label}: not measured")
        return False
    ok = value <= limit if at_most else value >= limit
    sign = "≤" if at_most else "≥"
    shown = f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    print(f"{'PASS' if ok else 'FAIL'}  {label}: {shown}{unit} (goal {sign} {limit:g}{unit})")
    return ok


def spread(values):
    """Largest ÷ smallest of the measured values, or None if fewer than two."""
    vs = [v for v in values if v is not None and v > 0]
    return max(vs) / min(vs) if len(vs) >= 2 else None


def ordered_unique(xs):
    seen = []
    for x in xs:
        if x not in seen:
            seen.append(x)
    return seen


def warn_failures(rows):
    """Failed joins or unsettled rounds make a figure suspect: say so next to it."""
    for r in rows:
        if r["kind"] in ("churn", "hold") and (num(r, "failed") or 0) > 0:
            print(f"WARN  {r['run']} {r['kind']} {r['phase']} c={r['concurrency'] or '-'}: "
                  f"{int(num(r, 'failed'))} joins failed (see the JSON line for the errors)")
        if r["kind"] == "churn" and r.get("settled") == "false":
            print(f"WARN  {r['run']} {r['phase']} c={r['concurrency']}: the server did not "
                  "settle within 10 s after the round; its CPU figure includes idle time")
        if r["kind"] == "churn" and (num(r, "load_cpu_share") or 0) > 0.9:
            print(f"WARN  {r['run']} {r['phase']} c={r['concurrency']}: the load generator used "
                  f"{num(r, 'load_cpu_share'):.0%} of its core; latency and joins/s are partly its own")


def join_report(args):
    rows = read_rows(args.csv)
    pop = [r for r in rows if r["run"] == "population"]
    churn = [r for r in pop if r["kind"] == "churn"]
    phases = ordered_unique(r["phase"] for r in churn)
    concurrencies = sorted({int(num(r, "concurrency")) for r in churn})
    ref = REFERENCE_CONCURRENCY if REFERENCE_CONCURRENCY in concurrencies else (
        concurrencies[len(concurrencies) // 2] if concurrencies else None)
    warn_failures(rows)

    print(f"\n== goal 1: server CPU per join at concurrency {ref}, by population phase")
    cost = {}
    for r in churn:
        if int(num(r, "concurrency")) == ref:
            cost[r["phase"]] = num(r, "server_cpu_us_per_join")
            print(f"  {r['phase']:>14}: {cost[r['phase']]} µs/join "
                  f"(net of idle load {r['server_cpu_us_per_join_net']} µs, "
                  f"{r['held']} held over {r['spaces']} spaces)")
    verdict(f"max/min CPU per join over {len(cost)} phases", spread(cost.values()),
            MAX_COST_SPREAD)

    print("\n== goal 2: at the RSA limit (population 0: joins activate spaces, leaves idle them)")
    print(f"  openssl rsa2048 verify/s on core 0: {args.openssl:.0f}")
    first = [r for r in churn if r["phase"] == "pop-0"]
    for r in first:
        us = num(r, "server_cpu_us_per_join")
        per_core = 1e6 / us if us else None
        ratio = per_core / args.openssl if per_core else None
        print(f"  c={r['concurrency']:>5}: {r['joins_per_sec']} joins/s, p50 {r['p50_ms']} ms, "
              f"p99 {r['p99_ms']} ms, max {r['max_ms']} ms, {us} µs/join, "
              f"{per_core and round(per_core)} joins per server core s, "
              f"{ratio and round(ratio, 3)} × openssl verify")
    by_c = {int(num(r, "concurrency")): r for r in first}
    if ref in by_c:
        us = num(by_c[ref], "server_cpu_us_per_join")
        verdict(f"joins/s per server core ÷ openssl verify/s (c={ref})",
                1e6 / us / args.openssl if us else None, MIN_RSA_RATIO, at_most=False)
    else:
        print("FAIL  no population-0 churn round at the reference concurrency")
    for c, target in P99_TARGET_MS.items():
        if c in by_c:
            verdict(f"p99 join latency at c={c}", num(by_c[c], "p99_ms"), target, " ms")
    worst = {}
    for r in churn:
        c = int(num(r, "concurrency"))
        worst[c] = max(worst.get(c, 0.0), num(r, "p99_ms") or 0.0)
    print("  (worst p99 over all phases: "
          + ", ".join(f"c={c}: {v} ms" for c, v in sorted(worst.items())) + ")")
    stages = [r for r in pop if r["kind"] == "stage" and r["phase"] == "pop-0"
              and int(num(r, "concurrency")) == ref]
    if stages:
        print(f"  per-stage µs per join (c={ref}, population 0; remainder = CPU per join − stages):")
        for r in stages:
            n = r["observations_per_join"]
            print(f"    {r['stage']}: {r['us_per_join']} µs" + (f" ({n} observations/join)" if n else ""))
    else:
        print("  per-stage breakdown: none (the server exposed no join stage metrics)")

    rooms = [r for r in rows if r["run"] == "rooms" and r["kind"] == "churn"
             and int(num(r, "concurrency")) == ref]
    if rooms:
        # Not a goal: a join into a space of N tells N others and each leave tells them
        # again, a cost bounded by the room (one frame, one write per member), not by
        # the node. Shown so that cost stays visible.
        print(f"\n== joins into populated rooms (c={ref}; not a goal: fan-out is bounded by the room)")
        base = None
        for r in rooms:
            per_space = (num(r, "population") or 0) / (num(r, "spaces") or 1)
            us = num(r, "server_cpu_us_per_join")
            line = f"  {per_space:g} per space: {us} µs/join, p99 {r['p99_ms']} ms"
            if per_space == 0:
                base = us
            elif base is not None and us is not None:
                line += (f"; {(us - base) / (2 * per_space):.1f} µs per frame told "
                         f"(participant_connected + participant_disconnected to each member)")
            print(line)

    # Not a goal of issue 10: joins over TLS (issue 11), the same churn on a server with a
    # certificate, against the plain run's population-0 figure at the same concurrency.
    plain = {int(num(r, "concurrency")): num(r, "server_cpu_us_per_join")
             for r in churn if r["phase"] == "pop-0"}
    tls_runs = [r for r in rows if r["run"].startswith("tls-") and r["kind"] == "churn"]
    if tls_runs:
        print("\n== joins over TLS (population 0; handshake + JWT + WebSocket, each on a new "
              "connection, as the SDK does)")
        names = {"tls-ec": "ECDSA P-256 certificate", "tls-rsa": "RSA-2048 certificate"}
        for r in tls_runs:
            c = int(num(r, "concurrency"))
            us = num(r, "server_cpu_us_per_join")
            line = (f"  {names.get(r['run'], r['run'])}, c={c}: {us} µs/join, "
                    f"{r['joins_per_sec']} joins/s, p99 {r['p99_ms']} ms")
            if plain.get(c) and us:
                line += f"; {us / plain[c]:.2f}× the plain join ({plain[c]} µs)"
            print(line)

    print(f"\n== goal 3: server RSS per idle joined connection")
    for run in ("population", "dense"):
        holds = [r for r in rows if r["run"] == run and r["kind"] == "hold"]
        if not holds:
            continue
        peak = max(holds, key=lambda r: num(r, "population") or 0)
        per_space = (num(peak, "population") or 0) / (num(peak, "spaces") or 1)
        verdict(f"{int(num(peak, 'held') or 0)} held at {per_space:g} per space",
                num(peak, "bytes_per_idle_connection_total"), MAX_BYTES_PER_IDLE, " B")

    if args.svg:
        with open(args.svg, "w") as f:
            f.write(join_svg(churn, phases, concurrencies, args.csv))


# --- chart -------------------------------------------------------------------------------

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
W, H = 980, 420
PANEL_W, PANEL_H = 380, 280
TOP = 70


def nice_ticks(top, n=5):
    """Round tick values from 0 to at least `top`."""
    if top <= 0:
        return [0, 1]
    raw = top / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [i * step for i in range(int(math.ceil(top / step)) + 1)]


def text(x, y, s, anchor="middle", size=12, extra=""):
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}" '
            f'{extra}>{html.escape(str(s))}</text>')


def axes(x0, y0, ticks, to_y, title, ylabel):
    """Frame, horizontal grid with labels, title and y label of one panel."""
    out = [f'<rect x="{x0}" y="{y0}" width="{PANEL_W}" height="{PANEL_H}" fill="none" stroke="#444"/>']
    for t in ticks:
        y = to_y(t)
        out.append(f'<line x1="{x0}" x2="{x0 + PANEL_W}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(text(x0 - 6, y + 4, f"{t:g}", "end", 11))
    out.append(text(x0 + PANEL_W / 2, y0 - 12, title, size=14, extra='font-weight="bold"'))
    out.append(text(x0 - 52, y0 + PANEL_H / 2, ylabel, extra=f'transform="rotate(-90 {x0 - 52} {y0 + PANEL_H / 2})"'))
    return out


def legend(x, y, entries):
    out = []
    for i, (label, color, dashed) in enumerate(entries):
        yy = y + i * 16
        dash = ' stroke-dasharray="4 3"' if dashed else ""
        out.append(f'<line x1="{x}" x2="{x + 18}" y1="{yy}" y2="{yy}" stroke="{color}" stroke-width="3"{dash}/>')
        out.append(text(x + 24, yy + 4, label, "start", 11))
    return out


def join_svg(churn, phases, concurrencies, source):
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'font-family="sans-serif" viewBox="0 0 {W} {H}">',
           '<rect width="100%" height="100%" fill="white"/>',
           text(W / 2, 22, f"spacegate join benchmark — {source}", size=13)]

    # Left: server CPU µs per join against the population phase, one line per concurrency.
    x0, y0 = 80, TOP
    values = [num(r, "server_cpu_us_per_join") or 0 for r in churn]
    ticks = nice_ticks(max(values, default=1) * 1.05)
    to_y = lambda v: y0 + PANEL_H - v / ticks[-1] * PANEL_H
    step = PANEL_W / max(len(phases), 1)
    to_x = lambda i: x0 + step * (i + 0.5)
    out += axes(x0, y0, ticks, to_y, "server CPU per join", "µs per join")
    for i, p in enumerate(phases):
        out.append(text(to_x(i), y0 + PANEL_H + 16, p, size=11))
    out.append(text(x0 + PANEL_W / 2, y0 + PANEL_H + 34, "population phase (participants held)", size=11))
    entries = []
    for k, c in enumerate(concurrencies):
        color = COLORS[k % len(COLORS)]
        pts = [(to_x(phases.index(r["phase"])), to_y(num(r, "server_cpu_us_per_join") or 0))
               for r in churn if int(num(r, "concurrency")) == c]
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="'
                   + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')
        out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>' for x, y in pts]
        entries.append((f"concurrency {c}", color, False))
    out += legend(x0 + 10, y0 + 14, entries)

    # Right: p50 and p99 latency per concurrency at population 0 (log scale), with targets.
    x0 = 80 + PANEL_W + 110
    first = {int(num(r, "concurrency")): r for r in churn if r["phase"] == "pop-0"}
    lat = [num(r, k) or 0 for r in first.values() for k in ("p50_ms", "p99_ms")]
    lat += [P99_TARGET_MS[c] for c in first if c in P99_TARGET_MS]
    lo = 10 ** math.floor(math.log10(max(min([v for v in lat if v > 0], default=0.1), 0.01)))
    hi = 10 ** math.ceil(math.log10(max(lat, default=1) * 1.01))
    decades = [lo * 10 ** i for i in range(round(math.log10(hi / lo)) + 1)]
    to_y = lambda v: y0 + PANEL_H - (math.log10(max(v, lo)) - math.log10(lo)) / math.log10(hi / lo) * PANEL_H
    out += axes(x0, y0, decades, to_y, "join latency at population 0", "ms (log scale)")
    cs = sorted(first)
    step = PANEL_W / max(len(cs), 1)
    bar = step / 4
    for i, c in enumerate(cs):
        cx = x0 + step * (i + 0.5)
        for j, (key, color) in enumerate((("p50_ms", "#7fa7d0"), ("p99_ms", "#1f4e79"))):
            v = num(first[c], key) or 0
            x = cx - bar + j * bar
            out.append(f'<rect x="{x:.1f}" y="{to_y(v):.1f}" width="{bar - 2:.1f}" '
                       f'height="{y0 + PANEL_H - to_y(v):.1f}" fill="{color}"/>')
            out.append(text(x + bar / 2 - 1, to_y(v) - 4, f"{v:.3g}", size=10))
        if c in P99_TARGET_MS:
            y = to_y(P99_TARGET_MS[c])
            out.append(f'<line x1="{cx - step / 2 + 6:.1f}" x2="{cx + step / 2 - 6:.1f}" y1="{y:.1f}" '
                       f'y2="{y:.1f}" stroke="#d62728" stroke-width="2" stroke-dasharray="4 3"/>')
        out.append(text(cx, y0 + PANEL_H + 16, f"c={c}", size=11))
    out.append(text(x0 + PANEL_W / 2, y0 + PANEL_H + 34, "joins in flight", size=11))
    out += legend(x0 + 10, y0 + 14,
                  [("p50", "#7fa7d0", False), ("p99", "#1f4e79", False), ("p99 target", "#d62728", True)])
    out.append("</svg>\n")
    return "\n".join(out)


# --- soak and media ----------------------------------------------------------------------

def soak_report(args):
    rows = read_rows(args.csv)
    warn_failures(rows)
    hold = next((r for r in rows if r["kind"] == "hold"), None)
    soak = next((r for r in rows if r["kind"] == "soak"), None)
    release = next((r for r in rows if r["kind"] == "release"), None)
    samples = [r for r in rows if r["kind"] == "sample"]
    if samples:
        rss = [num(r, "rss_kb") for r in samples]
        print(f"  {len(samples)} samples over {samples[-1]['t_secs']} s: server RSS "
              f"{min(rss):.0f}–{max(rss):.0f} kB, CPU share per interval up to "
              f"{max((num(r, 'server_cpu_share') or 0) for r in samples):.2%}")
    joined = num(hold, "joins") if hold else None
    ok = joined is not None and joined >= args.connections
    print(f"{'PASS' if ok else 'FAIL'}  joined {joined and int(joined)} of {args.connections}")
    verdict("connections dropped while held", num(release, "dropped") if release else None, 0)
    drift = num(soak, "rss_drift") if soak else None
    verdict(f"server RSS drift over {soak and soak['seconds']} s held (|end/start − 1|)",
            abs(drift) if drift is not None else None, MAX_RSS_DRIFT)
    verdict("idle server CPU share (cores)", num(soak, "server_cpu_share") if soak else None,
            MAX_IDLE_CPU_SHARE)
    churn = {r["phase"]: num(r, "server_cpu_us_per_join") for r in rows if r["kind"] == "churn"}
    before, after = churn.get("pop-0"), churn.get("after-release")
    print(f"  CPU per join at c=100: before the ramp {before} µs, after the release {after} µs")
    verdict("join cost after ÷ before the soak", after / before if before and after else None,
            MAX_COST_SPREAD)


def media_report(args):
    def load(path):
        with open(path) as f:
            return json.loads(f.readline())
    base, idle = load(args.without), load(args.with_)
    a = base.get("server_cpu_us_per_forwarded_packet")
    b = idle.get("server_cpu_us_per_forwarded_packet")
    print(f"  N={base['subscribers']}: {a} µs per forwarded packet alone, {b} µs with "
          f"{idle.get('idle_participants')} signaling-only participants held "
          f"({idle.get('idle_held_at_end')} still held at the end)")
    verdict("CPU per forwarded packet with ÷ without the idle population",
            b / a if a and b else None, MAX_COST_SPREAD)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    j = sub.add_parser("join")
    j.add_argument("--csv", required=True)
    j.add_argument("--openssl", type=float, required=True)
    j.add_argument("--svg")
    s = sub.add_parser("soak")
    s.add_argument("--csv", required=True)
    s.add_argument("--connections", type=int, required=True)
    m = sub.add_parser("media")
    m.add_argument("without")
    m.add_argument("with_", metavar="with")
    args = p.parse_args()
    {"join": join_report, "soak": soak_report, "media": media_report}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
