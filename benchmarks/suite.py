"""The benchmark suite: every speed figure of distvi, one command, one table.

Runs each benchmark script in its own process (one Ray instance at a time, a clean driver for
the memory figure), reads the JSON each writes under ``benchmarks/results/``, and prints one
Markdown table: each measure, distvi's figure, the reference measured in the same run, the
ratio, the target, and whether it is met. The table and the raw results go to
``benchmarks/results/suite.json``; ``--markdown FILE`` also writes the table to a file.

    .venv/bin/python benchmarks/suite.py            # everything (about 25 minutes here)
    .venv/bin/python benchmarks/suite.py --quick    # smoke run of every part (a few minutes)
    .venv/bin/python benchmarks/suite.py --only a,c # some parts
    .venv/bin/python benchmarks/suite.py --table    # print the table of the last results

Parts: (a) ADVI per-iteration speed vs pymc.fit (and NumPyro when installed), (b) time to an
exact posterior, (c) SVGD vs pymc.fit, (d) Ray per-step overhead and 2-vs-1 worker scaling,
(e) driver peak RSS against rows, (f) the soak: 200,000 recorded steps, driver memory and
file handles flat, every step recorded once (``bench_soak.py``), (g) fits run until converged
(``fit(None)``): wall time against a hand-annealed pm.fit on the conjugate regression, and sds
against a Laplace approximation on a 1M-row Student-t regression on two Ray workers
(``bench_converge.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import RESULTS, cpu_model, now_utc  # noqa: E402


def _script(name: str) -> list[str]:
    return [sys.executable, str(HERE / name)]


def commands(quick: bool) -> dict[str, list[list[str]]]:
    """Part -> the processes it runs (each writes its JSON under ``RESULTS``)."""
    q = ["--quick"] if quick else []
    ray_small = ["--steps", "100", "--rows", "200000", "--dim", "20", "--batch", "5000"] if quick else []
    return {
        "a": [_script("bench_advi.py") + q + ["--out", str(RESULTS / "advi.json")]],
        "b": [_script("bench_exact.py") + q + ["--out", str(RESULTS / "exact.json")]],
        "c": [_script("bench_svgd.py") + q + ["--no-kernel", "--out", str(RESULTS / "svgd_speed.json")]],
        "d": [_script("bench_ray.py") + ["overhead"] + (["--steps", "100"] if quick else [])
              + ["--out", str(RESULTS / "ray_overhead.json")],
              _script("bench_ray.py") + ["scaling"] + ray_small + ["--out", str(RESULTS / "ray_scaling.json")]],
        "e": [_script("bench_ray.py") + ["memory"] + ray_small + ["--out", str(RESULTS / "ray_memory.json")]],
        "f": [_script("bench_soak.py") + q + ["--json", str(RESULTS / "soak.json")]],
        "g": [_script("bench_converge.py") + q + ["--out", str(RESULTS / "converge.json")]],
    }


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def _fmt(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def rows() -> list[dict]:
    """The table's rows from the results on disk."""
    out = []
    advi = _load("advi.json")
    if advi:
        p = advi["pymc"]["summary"]["it_per_s_median"]
        d = advi["distvi"]["summary"]["it_per_s_median"]
        ratio = advi.get("ratio_distvi_over_pymc_it_per_s")
        out.append({"part": "a", "measure": "ADVI it/s, logistic 200k x 20, batch 1,000",
                    "distvi": _fmt(d, ",.0f"), "reference": f"pymc.fit {_fmt(p, ',.0f')}",
                    "ratio": ratio, "target": ">= 10x", "met": ratio is not None and ratio >= 10})
        nump = (advi.get("numpyro") or {}).get("summary") or {}
        if nump.get("it_per_s_median"):
            r = d / nump["it_per_s_median"] if d else None
            out.append({"part": "a", "measure": "ADVI it/s, same job", "distvi": _fmt(d, ",.0f"),
                        "reference": f"NumPyro SVI {nump['it_per_s_median']:,.0f}", "ratio": r,
                        "target": "(for reference)", "met": None})
    exact = _load("exact.json")
    if exact:
        s = exact["summary"]
        r = exact.get("ratio_distvi_over_pymc_time")
        out.append({"part": "b", "measure": "FullRankADVI wall s to exact posterior (sd 2 %, mean 0.2 sd)",
                    "distvi": _fmt(s["distvi"]["seconds_median"], ".2f"),
                    "reference": f"pymc.fit {_fmt(s['pymc']['seconds_median'], '.2f')}",
                    "ratio": None if not r else 1 / r, "target": "time <= 1/5 (>= 5x)",
                    "met": r is not None and r <= 0.2})
    svgd = _load("svgd_speed.json")
    if svgd:
        for row in svgd["svgd_vs_pymc"]:
            out.append({"part": "c", "measure": f"SVGD it/s, {row['particles']} particles",
                        "distvi": _fmt(row["distvi_it_s"], ",.1f"),
                        "reference": f"pymc.fit {row['pymc_it_s']:,.1f}", "ratio": row["ratio"],
                        "target": ">= 3x", "met": row["ratio"] >= 3})
    over = _load("ray_overhead.json")
    if over:
        for k, r in over["overhead_s_per_step"].items():
            ms = 1e3 * r["ray compiled"]
            target = "<= 0.8 ms" if k == "2" else ""
            out.append({"part": "d", "measure": f"Ray ms/step, compiled graph, {k} worker(s)",
                        "distvi": f"{ms:.2f}", "reference": f"plain calls {1e3 * r['ray plain']:.2f}",
                        "ratio": r["ray plain"] / r["ray compiled"], "target": target,
                        "met": (ms <= 0.8) if k == "2" else None})
    scaling = _load("ray_scaling.json")
    if scaling:
        s = scaling["scaling"]
        out.append({"part": "d", "measure": "rows/s, 2 vs 1 worker (Zarr job)",
                    "distvi": f"{s['2']['rows_per_s']:,.0f}", "reference": f"1 worker {s['1']['rows_per_s']:,.0f}",
                    "ratio": scaling["ratio"], "target": ">= 1.7x", "met": scaling["ratio"] >= 1.7})
    mem = _load("ray_memory.json")
    if mem:
        sizes = mem["peak_rss_mb"]
        slope = mem.get("slope_mb_per_million_rows")
        spread = max(sizes.values()) - min(sizes.values())
        out.append({"part": "e", "measure": "driver peak RSS MB at " + ", ".join(f"{int(k):,}" for k in sizes) + " rows",
                    "distvi": " / ".join(f"{v:.0f}" for v in sizes.values()),
                    "reference": f"slope {_fmt(slope, '+.2f')} MB per 1M rows", "ratio": None,
                    "target": "flat (spread <= 50 MB)", "met": spread <= 50})
    soak = _load("soak.json")
    if soak and soak.get("stats"):
        st = soak["stats"]
        out.append({"part": "f", "measure": f"soak, {soak['config']['n']:,} steps with store + MLflow: "
                                            "driver RSS MB / fds per 100k steps",
                    "distvi": f"{st['rss_mb']['slope_per_100k']:+.1f} / {st['fds']['slope_per_100k']:+.2f}",
                    "reference": f"trace arrays {st['rss_mb']['slope_per_100k'] - st['rss_mb']['net_slope_per_100k']:+.2f} MB",
                    "ratio": None, "target": "flat; every step recorded once",
                    "met": bool(st["flat"] and soak.get("all_checks_pass"))})
    conv = _load("converge.json")
    if conv:
        conj = conv.get("conjugate")
        if conj:
            s, ratios = conj["summary"], conj["ratios"]
            d = s["distvi"]
            r = ratios.get("pymc_over_distvi_wall")
            out.append({"part": "g", "measure": "FullRankADVI `fit(None)` wall s, conjugate 20k x 6 "
                                                "(vs 3 x 10k annealed adam, 4 draws)",
                        "distvi": _fmt(d["wall_s_median"], ".2f"),
                        "reference": f"pymc.fit {_fmt(s['pymc']['wall_s_median'], '.2f')}",
                        "ratio": r, "target": "time <= 1/5 (>= 5x)", "met": r is not None and r >= 5})
            if "numpyro" in s:
                out.append({"part": "g", "measure": "same job", "distvi": _fmt(d["wall_s_median"], ".2f"),
                            "reference": f"NumPyro SVI {_fmt(s['numpyro']['wall_s_median'], '.2f')}",
                            "ratio": ratios.get("numpyro_over_distvi_wall"), "target": "(for reference)",
                            "met": None})
        st = conv.get("student")
        if st:
            s = st["summary"]
            worst = s["max_sd_rel_err_worst"]
            out.append({"part": "g", "measure": f"`fit(None)` Student-t {st['config']['rows']:,} x {st['config']['d']}, "
                                                "2 Ray workers: worst sd error vs Laplace",
                        "distvi": _fmt(worst and 100 * worst, ".1f") + " %",
                        "reference": f"converged {s['converged']}/{s['ok']}, {_fmt(s['wall_s_median'], '.0f')} s",
                        "ratio": None, "target": "<= 10 %", "met": bool(st["target_met"])})
    return out


def table(rs: list[dict]) -> str:
    lines = ["| part | measure | distvi | reference (same run) | ratio | target | met |",
             "|---|---|---:|---:|---:|---|---|"]
    for r in rs:
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        lines.append(f"| {r['part']} | {r['measure']} | {r['distvi']} | {r['reference']} | "
                     f"{_fmt(r['ratio'], '.2f') + 'x' if r['ratio'] is not None else ''} | {r['target']} | {met} |")
    return "\n".join(lines)


def machine() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "loadavg": os.getloadavg()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run of every part")
    ap.add_argument("--only", default="abcdefg", help="parts to run, e.g. 'a,c' (default: all)")
    ap.add_argument("--table", action="store_true", help="only print the table of the results on disk")
    ap.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = ap.parse_args(argv)
    parts = [p for p in args.only.replace(",", "") if p.strip()]
    unknown = sorted(set(parts) - set("abcdefg"))
    if unknown:
        ap.error(f"--only: unknown part(s) {', '.join(unknown)}; the parts are a, b, c, d, e, f, g")
    started = now_utc()
    failed = []
    timings = {}
    if not args.table:
        RESULTS.mkdir(parents=True, exist_ok=True)
        for part, cmds in commands(args.quick).items():
            if part not in parts:
                continue
            t0 = time.perf_counter()
            for cmd in cmds:
                print(f"# ({part}) {' '.join(Path(c).name if c.endswith('.py') else c for c in cmd[1:])}",
                      flush=True)
                res = subprocess.run(cmd, cwd=HERE.parent)
                if res.returncode != 0:
                    failed.append(f"({part}) {Path(cmd[1]).name} exited {res.returncode}")
            timings[part] = time.perf_counter() - t0
    rs = rows()
    text = table(rs)
    print(f"\n## distvi benchmark suite — {started}" + (" (--quick)" if args.quick else ""))
    m = machine()
    print(f"machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, load average at the end "
          f"{m['loadavg'][0]:.2f}\n")
    print(text)
    if failed:
        print("\nFAILED: " + "; ".join(failed))
    if not args.table:
        (RESULTS / "suite.json").write_text(json.dumps(
            {"date": started, "quick": args.quick, "parts": parts, "machine": m,
             "seconds_per_part": timings, "rows": rs, "failed": failed}, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
