#!/usr/bin/env python3
"""Tables and the KL plot of what the model says under sparse attention.

Reads the `--json` outputs of `pqcache-llm perplexity` (one per text) and, optionally, of
`pqcache-llm passkey`, and prints Markdown tables: per text, method and budget the perplexity
(and its change over dense), KL(dense || method), the KL over the oracle's (`exact` at the
same budget and options), top-1 agreement and decode ms/token; per passkey cell the trials
passed. With `--plot OUT.png` (needs matplotlib) it draws KL against the budget per method,
one panel per text, log scales.

usage: llm-quality.py [--plot OUT.png] [--passkey PASSKEY.json] NAME=PPL.json[,MORE.json] ...
(scripts/llm-quality.sh runs the commands and this script.)
"""
import argparse
import json
import math


def load(spec):
    """`NAME=A.json[,B.json...]`: runs of the same text and protocol, rows merged (dense
    from the first)."""
    name, paths = spec.split("=", 1)
    merged = None
    for path in paths.split(","):
        with open(path) as f:
            d = json.load(f)
        if merged is None:
            merged = d
        else:
            merged["rows"] += [r for r in d["rows"] if r["attention"] != "dense"]
    return name, merged


def oracle_of(attention):
    """`exact` with the method's attention options (the part after `+`)."""
    opts = attention.split("+")[1:]
    return "+".join(["exact"] + opts)


def ppl_table(name, d):
    rows = d["rows"]
    dense = next(r for r in rows if r["attention"] == "dense")
    kl = {(r["attention"], r["budget"]): r["kl"] for r in rows}
    out = [
        f"**{name}** ({d['tokens']} tokens, {d['prefill']} prefilled densely, "
        f"{d['tokens'] - d['prefill']} decoded; dense ppl {dense['ppl']:.2f}, "
        f"{dense['ms_per_token']:.1f} ms/token)",
        "",
        "| method | budget | ppl | vs dense | KL | KL / exact | NLL - exact's | top-1 | ms/token |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    body = [r for r in rows if r["attention"] != "dense"]
    body.sort(key=lambda r: (-r["budget"], r["attention"] != "exact", r["attention"]))
    for r in body:
        ex = kl.get((oracle_of(r["attention"]), r["budget"]))
        ratio = f"{r['kl'] / ex:.2f}" if ex else "-"
        # One standard error of the paired per-position gaps (runs since they were
        # reported): the perplexity gap's in percent, about 100 x the NLL's.
        se = r.get("dnll_se")
        gap = f"{100 * (r['ppl'] / dense['ppl'] - 1):+.2f} %"
        if se is not None:
            gap += f" ± {100 * se:.2f}"
        vs = r.get("oracle_dnll")
        vs = f"{vs:+.4f} ± {r['oracle_dnll_se']:.4f}" if vs is not None else "-"
        out.append(
            f"| {r['attention']} | {r['budget']:g} | {r['ppl']:.2f} | {gap} | "
            f"{r['kl']:.4f} | {ratio} | {vs} | {r['top1']:.3f} | {r['ms_per_token']:.1f} |"
        )
    return "\n".join(out)


def passkey_table(d):
    rows = d["rows"]
    lengths = sorted({r["length"] for r in rows})
    out = [
        "| method | budget | " + " | ".join(f"{n} tokens" for n in lengths) + " |",
        "|---|---|" + "---|" * len(lengths),
    ]
    keys = []
    for r in rows:
        k = (r["attention"], r["budget"])
        if k not in keys:
            keys.append(k)
    for att, budget in keys:
        cells = []
        for n in lengths:
            sel = [r for r in rows if (r["attention"], r["budget"], r["length"]) == (att, budget, n)]
            passed = sum(r["passed"] for r in sel)
            trials = sum(r["trials"] for r in sel)
            depths = " ".join(
                f"{r['depth']:g}:{r['passed']}/{r['trials']}" for r in sorted(sel, key=lambda r: r["depth"])
            )
            cells.append(f"{passed}/{trials} ({depths})")
        out.append(f"| {att} | {budget:g} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(texts, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(texts), figsize=(5 * len(texts), 4), squeeze=False)
    for ax, (name, d) in zip(axes[0], texts):
        methods = []
        for r in d["rows"]:
            if r["attention"] != "dense" and r["attention"] not in methods:
                methods.append(r["attention"])
        for m in methods:
            pts = sorted((r["budget"], r["kl"]) for r in d["rows"] if r["attention"] == m)
            pts = [(b, k) for b, k in pts if k > 0 and math.isfinite(k)]
            style = "-" if "notail" not in m else "--"
            ax.plot([100 * b for b, _ in pts], [k for _, k in pts], style, marker="o", label=m)
        ax.set_xscale("log")
        ax.set_yscale("log")
        budgets = sorted({100 * r["budget"] for r in d["rows"] if r["attention"] != "dense"})
        ax.set_xticks(budgets)
        ax.set_xticks([], minor=True)
        ax.set_xticklabels([f"{b:g}" for b in budgets])
        ax.set_xlabel("budget (% of the context)")
        ax.set_ylabel("KL(dense || method), nats/token")
        ax.set_title(f"{name}, {d['tokens']} tokens")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.suptitle("Gemma-3-270M: next-token KL to full attention (dashed: no tail term)")
    fig.tight_layout(rect=(0, 0, 0.87, 1))
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("texts", nargs="+", help="NAME=PPL.json")
    ap.add_argument("--passkey")
    ap.add_argument("--plot")
    a = ap.parse_args()
    texts = [load(t) for t in a.texts]
    for name, d in texts:
        print(ppl_table(name, d))
        print()
    if a.passkey:
        with open(a.passkey) as f:
            print(passkey_table(json.load(f)))
    if a.plot:
        plot(texts, a.plot)


if __name__ == "__main__":
    main()
