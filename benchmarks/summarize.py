"""Turn pytest-benchmark JSON files into the Markdown tables of benchmarks/RESULTS.md.

Usage: python benchmarks/summarize.py benchmarks/results/*.json > benchmarks/RESULTS.md
"""
import json
import sys


def rows(report: dict):
    for bench in report["benchmarks"]:
        info = bench.get("extra_info", {})
        if "gb_per_s" in info:
            yield info, bench["stats"]["median"]


def step_table(report: dict) -> list[str]:
    """End-to-end steps: (b)/(c) overhead over the forward floor, (a)/(b) speed-up over the MeZO reference."""
    steps = [(b["extra_info"], b["stats"]["median"]) for b in report["benchmarks"]
             if b.get("extra_info", {}).get("op") == "zo_step"]
    if not steps:
        return []
    floor = {i["step_kind"]: t for i, t in steps if i["step_kind"].startswith("forward-x")}
    inference_peak = next((i["peak_memory_bytes"] for i, _ in steps if i["step_kind"] == "forward-x2"), None)
    reference = next((t for i, t in steps if i["step_kind"] == "mezo-reference"), None)
    env = steps[0][0]
    batch = f" ({env['batch']})" if "batch" in env else ""
    lines = ["", f"### End-to-end ZO step: `{env['model']}` model, {env['model_dtype']}, "
                 f"{env['tokens_per_step']} tokens per step{batch}", "",
             "| step | median ms | tokens/s | × forward floor | speed-up vs MeZO reference | peak memory / inference |",
             "|---|---:|---:|---:|---:|---:|"]
    for info, median in steps:
        forwards = info.get("forwards", 2)
        zokern = info["step_kind"] in ("zokern", "zokern-probes", "zokern-side-path")
        over = f"{median / floor[f'forward-x{forwards}']:.2f}" if (zokern or info["step_kind"] == "mezo-reference") \
            and f"forward-x{forwards}" in floor else "—"
        speedup = f"{reference / median:.2f}×" if reference and zokern else "—"
        peak = f"{info['peak_memory_bytes'] / inference_peak:.2f}" if inference_peak and info.get("peak_memory_bytes") \
            else "—"
        lines.append(f"| {info['method']} ({info['step_kind']}) | {median * 1e3:.1f} | {info['tokens_per_s']:.0f} | "
                     f"{over} | {speedup} | {peak} |")
    return lines


def _label(info: dict) -> str:
    return f"{info['op']} (r={info['rank']})" if "rank" in info else info["op"]


def _dist(info: dict) -> str:
    return info.get("dist") or "—"


def _cache_note(group: list, llc_bytes: int) -> str:
    """Whether the set's tensors fit in the last-level cache (results from before set_bytes was recorded: unknown)."""
    sizes = {i["dtype"]: i["set_bytes"] for i, _ in group if "set_bytes" in i}
    if not sizes or not llc_bytes:
        return ""
    fits = sorted(d for d, b in sizes.items() if b <= llc_bytes)
    per_dtype = ", ".join(f"{d} {b / 2**20:.0f} MiB" for d, b in sorted(sizes.items()))
    if not fits:
        return f" Set sizes {per_dtype}: all larger than the {llc_bytes / 2**20:.0f} MiB last-level cache, every pass streams."
    return (f" Set sizes {per_dtype}; {', '.join(fits)} fit in the {llc_bytes / 2**20:.0f} MiB last-level cache, so "
            "those passes can run from the cache and \"% of copy\" is not a memory-limit figure there.")


def table(path: str) -> str:
    """One table per shape set of a results file (files from before shape sets were a parameter name theirs
    in the environment)."""
    with open(path) as f:
        report = json.load(f)
    entries = list(rows(report))
    if not entries:
        return "\n".join([f"## {path}", ""] + step_table(report)) + "\n"
    env = entries[0][0]
    copy = (f"streaming copy bandwidth {env['copy_gb_per_s']:.1f} GB/s (read + write; source and destination each at "
            f"least twice the {env['llc_bytes'] / 2**20:.0f} MiB last-level cache)" if env.get("llc_bytes") else
            f"copy bandwidth {env['copy_gb_per_s']:.0f} GB/s (read + write)")
    threads = f"{env['threads']} thread{'s' if env['threads'] > 1 else ''} (torch and zokern); " if "threads" in env else ""
    if "zokern_cpu_simd" in env:
        threads += (f"zokern's C++ CPU kernels capped at the {env['zokern_cpu_simd']} level (ZOKERN_CPU_SIMD; torch's "
                    "eager references run at the CPU's own); ")
    lines = [f"## {env['device']} — {env['date']}", "",
             f"torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, python {env['python']}; {threads}measured "
             f"{copy}. Source: `{path}`."]
    by_shapes: dict = {}
    for info, median in entries:
        by_shapes.setdefault(info["shapes"], []).append((info, median))
    for shapes, group in by_shapes.items():
        # The authors' references draw Gaussians: every distribution's row is compared with them.
        baseline = {(_label(i), i["dtype"]): t for i, t in group if i["backend"].endswith("-reference")}
        note = _cache_note(group, env.get("llc_bytes", 0)).strip()
        lines += ["", f"### `{shapes}` ({group[0][0]['elements'] / 1e6:.1f}M elements)", ""] + ([note, ""] if note else [])
        lines += [f"| op | backend | dist | dtype | median ms | GB/s | % of {'streaming ' if note else ''}copy | Gelem/s | "
                  "speed-up vs authors' reference |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|"]
        for info, median in sorted(group, key=lambda e: (_label(e[0]), e[0]["dtype"], e[0]["backend"], _dist(e[0]))):
            base = baseline.get((_label(info), info["dtype"]))
            speedup = f"{base / median:.2f}×" if base else "—"
            lines.append(f"| {_label(info)} | {info['backend']} | {_dist(info)} | {info['dtype']} | {median * 1e3:.3f} | "
                         f"{info['gb_per_s']:.1f} | {100 * info['fraction_of_copy']:.1f}% | "
                         f"{info['elements_per_s'] / 1e9:.3f} | {speedup} |")
    return "\n".join(lines + step_table(report)) + "\n"


def main(paths: list[str]) -> None:
    print("# zokern benchmark results\n")
    print("Generated by `benchmarks/summarize.py` from the raw pytest-benchmark JSON in `benchmarks/results/`.")
    print("Bytes moved count one read and one write of every parameter element per pass; the MeZO reference")
    print("rows are charged the same bytes as the fused op they replace, so their GB/s is useful work per second.\n")
    for path in paths:
        print(table(path))


if __name__ == "__main__":
    main(sys.argv[1:])
