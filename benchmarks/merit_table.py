#!/usr/bin/env python
"""Markdown tables of benchmarks/results/merit.jsonl (docs/optimiser.md): predicted speed-ups per task.

    python benchmarks/merit_table.py [--tag sst2-earlier]

Cross-fitted entries (a preconditioner D or a module subset fitted on one half of the rows) are
scored against random A on the *other* half; "q+k" combines the per-kind figures (|g|², E|g_b|²
and tr(H) add over disjoint modules).
"""

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "merit.jsonl"


def mb(f: dict) -> float:
    return f["g2"] * abs(f["g2"]) / (f["gb2"] * f["trH"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tag")
    args = p.parse_args()
    rows = [json.loads(x) for x in RESULTS.read_text().splitlines() if x.strip()]
    latest = {}
    for r in rows:
        if r.get("candidate") == "check":
            continue
        latest[(r["tag"], r["candidate"])] = r  # the last run of each (task, candidate)
    tags = [args.tag] if args.tag else list(dict.fromkeys(t for t, _ in latest))
    for tag in tags:
        cand = {c: r for (t, c), r in latest.items() if t == tag}
        ref = cand["random_seed0"]
        n = ref["n"]
        print(f"\n### {tag}: {n} scored rows, b = {ref['b']}, q = {ref['q']}\n")
        print("| candidate | |g|² | E|g_b|² | tr(H) (GGN) | predicted speed-up: all rows (half 1, half 2) | full-batch |g|²/tr(H) ratio | lr* / lr*(random) |")
        print("|---|---|---|---|---|---|---|")
        for c, r in cand.items():
            if "D[" in c or "per-module" in c or "best module" in c:  # fitted on half h, scored on half 1-h
                hs = [mb(r["halves"][h]) / mb(ref["halves"][1 - h]) for h in (0, 1)]
                sp = sum(hs) / 2
            else:
                hs = [mb(r["halves"][h]) / mb(ref["halves"][h]) for h in (0, 1)]
                sp = r["speedup"]
            print(f"| {c} | {r['g2']:.3g} | {r['gb2']:.3g} | {r['trH']:.3g} | **{sp:.2f}** ({hs[0]:.2f}, {hs[1]:.2f}) | "
                  f"{r['speedup_fullbatch']:.2f} | {r['lr_rel']:.3g} |")
        for base in ("random_seed0", "act_pca", "generic_grad_svd"):
            parts = [cand.get(f"{base}, {k} only") for k in ("q_proj", "k_proj")]
            if all(parts):
                f = {k: sum(x[k] for x in parts) for k in ("g2", "gb2", "trH")}
                hs = [mb({k: sum(x["halves"][h][k] for x in parts) for k in ("g2", "gb2", "trH")}) / mb(ref["halves"][h]) for h in (0, 1)]
                lr = (f["g2"] / (f["gb2"] * f["trH"])) / (ref["g2"] / (ref["gb2"] * ref["trH"]))
                print(f"| {base}, q_proj + k_proj only | {f['g2']:.3g} | {f['gb2']:.3g} | {f['trH']:.3g} | **{mb(f) / mb(ref):.2f}** "
                      f"({hs[0]:.2f}, {hs[1]:.2f}) | {(f['g2'] / f['trH']) / (ref['g2'] / ref['trH']):.2f} | {lr:.3g} |")
        share = {c.split(", ")[1].split(" ")[0]: r["g2"] / ref["g2"] for c, r in cand.items() if c.startswith("random_seed0, ") and "only" in c}
        print("\nshare of |g|² by kind (random A): " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in share.items()))


if __name__ == "__main__":
    main()
