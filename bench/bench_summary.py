#!/usr/bin/env python3
"""Collects and summarises the runs of bench/{pp,tp,fsdp,precision}_bench.sh (plain Python, no
PyTorch needed).

  bench_summary.py ours RESULTS ROUND NAME RUN_DIR LOG TOKENS_PER_STEP SKIP
      a `scaletrain train` run: median `step_secs` of RUN_DIR/metrics.jsonl after the first SKIP
      steps (or, failing that, the median step the report in LOG prints); tokens/s =
      TOKENS_PER_STEP / median step; parameter count from LOG; first and last training loss.
  bench_summary.py ours-bench RESULTS ROUND NAME JSON_FILE
      a `scaletrain bench train --json` run (its tokens_per_sec).
  bench_summary.py torch RESULTS ROUND NAME OUT_FILE [MODE THREADS]
      a PyTorch peer: the last JSON line with tokens_per_sec in OUT_FILE (with MODE and THREADS:
      the autocast script's line for that mode and thread count).
  bench_summary.py report RESULTS 'A/B>=1.25' ...
      per name the median tokens/s over rounds and every round; per comparison the median of the
      per-round ratios A/B (rounds where both ran), the ratio of the medians, and the target;
      'A/B|C' divides by the faster of B and C in each round.

RESULTS is a tab-separated file this script appends to: `tps ROUND NAME VALUE`,
`params NAME N`, `loss NAME FIRST LAST`.
"""
import json
import re
import statistics
import sys


def append(path, *fields):
    with open(path, "a") as f:
        f.write("\t".join(str(x) for x in fields) + "\n")


def ours(results, rnd, name, run_dir, log, tokens_per_step, skip):
    tokens_per_step, skip = float(tokens_per_step), int(skip)
    text = open(log, errors="replace").read()
    steps, losses, reported = [], [], []
    try:
        with open(f"{run_dir}/metrics.jsonl") as f:
            for line in f:
                rec = json.loads(line)
                if "step_secs" in rec and rec.get("step", 0) > skip:
                    steps.append(rec["step_secs"])
                    if "tokens_per_sec" in rec:
                        reported.append(rec["tokens_per_sec"] * rec["step_secs"])
                if "loss" in rec:
                    losses.append(rec["loss"])
    except (OSError, ValueError):
        pass
    source = "metrics.jsonl"
    if not steps:
        m = re.search(r"measured ([0-9.]+) ms \(median", text)
        if not m:
            print(f"  {name}: no step times in {run_dir}/metrics.jsonl nor in {log}")
            return 1
        steps, source = [float(m.group(1)) / 1000.0], "the report's median"
    step = statistics.median(steps)
    if reported and abs(statistics.median(reported) / tokens_per_step - 1) > 0.01:
        print(f"  {name}: WARNING: the run reports {statistics.median(reported):,.0f} tokens per "
              f"step, this script expected {tokens_per_step:,.0f}: check the batch flags")
    append(results, "tps", rnd, name, tokens_per_step / step)
    m = re.search(r"-> (\d+) parameters", text)
    if m:
        append(results, "params", name, m.group(1))
    if len(losses) >= 2:
        append(results, "loss", name, losses[0], losses[-1])
    print(f"  {name}: {tokens_per_step / step:,.0f} tokens/s (median step {step * 1e3:.1f} ms "
          f"over {len(steps)} steps, {source})")
    return 0


def ours_bench(results, rnd, name, json_file):
    for line in reversed(open(json_file, errors="replace").read().splitlines()):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        tps = rec.get("tokens_per_sec") or rec.get("scaletrain", {}).get("tokens_per_sec")
        if tps:
            append(results, "tps", rnd, name, tps)
            n = rec.get("params", rec.get("config", {}).get("params"))
            if n:
                append(results, "params", name, n)
            print(f"  {name}: {tps:,.0f} tokens/s")
            return 0
    print(f"  {name}: no tokens_per_sec in {json_file}")
    return 1


def torch_run(results, rnd, name, out_file, mode=None, threads=None):
    rec = None
    for line in open(out_file, errors="replace").read().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if not isinstance(r, dict) or "tokens_per_sec" not in r or r.get("summary"):
            continue
        if mode is not None and (r.get("mode") != mode or r.get("threads") != int(threads)):
            continue
        rec = r
    if rec is None:
        print(f"  {name}: no result line in {out_file}")
        return 1
    append(results, "tps", rnd, name, rec["tokens_per_sec"])
    append(results, "params", name, rec["params"])
    append(results, "loss", name, rec["first_loss"], rec["final_loss"])
    print(f"  {name}: {rec['tokens_per_sec']:,.0f} tokens/s (median step "
          f"{rec['step_secs'] * 1e3:.1f} ms over {rec['steps_timed']} steps), loss "
          f"{rec['first_loss']:.4f} -> {rec['final_loss']:.4f}")
    return 0


def report(results, comparisons):
    tps, params, losses, order = {}, {}, {}, []
    try:
        lines = open(results).read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        f = line.split("\t")
        if f[0] == "tps":
            rnd, name, v = int(f[1]), f[2], float(f[3])
            if name not in tps:
                order.append(name)
            tps.setdefault(name, {})[rnd] = v
        elif f[0] == "params":
            params[f[1]] = int(f[2])
        elif f[0] == "loss":
            losses[f[1]] = (float(f[2]), float(f[3]))
    print("\n== tokens/s (median over rounds; every round)")
    for name in order:
        vals = [tps[name][r] for r in sorted(tps[name])]
        print(f"  {name:<24} {statistics.median(vals):>10,.0f}   "
              + ", ".join(f"{v:,.0f}" for v in vals))
    if params:
        print("== parameters (each run's own count)")
        for name, n in params.items():
            print(f"  {name:<24} {n:>10,}")
        if len(set(params.values())) > 1:
            print("  MISMATCH: the runs do not train the same number of parameters")
    if losses:
        print("== training loss, first step -> last step of the last round")
        for name, (a, b) in losses.items():
            print(f"  {name:<24} {a:.4f} -> {b:.4f}  {'decreased' if b < a else 'DID NOT DECREASE'}")
    print("== ratios (median of per-round ratios; ratio of medians)")
    for comp in comparisons:
        m = re.fullmatch(r"([^/]+)/([^>]+?)(?:>=([0-9.]+))?", comp)
        if not m:
            print(f"  bad comparison {comp!r}: write A/B, A/B>=TARGET or A/B|C (B or C, the faster)")
            continue
        a, target = m.group(1), m.group(3)
        bs = m.group(2).split("|")
        missing = [x for x in [a] + bs if x not in tps]
        if missing:
            print(f"  {a} / {m.group(2)}: not measured ({' and '.join(missing)} did not run)")
            continue
        rounds = sorted(set(tps[a]).intersection(*(set(tps[b]) for b in bs)))
        per = [tps[a][r] / max(tps[b][r] for b in bs) for r in rounds]
        of_medians = statistics.median(tps[a].values()) / max(
            statistics.median(tps[b].values()) for b in bs)
        verdict = ""
        if target:
            verdict = f"; target >= {target}: " + ("met" if statistics.median(per) >= float(target)
                                                   else "NOT met")
        label = bs[0] if len(bs) == 1 else "max(" + ", ".join(bs) + ")"
        print(f"  {a} / {label}: {statistics.median(per):.2f} (rounds: "
              + ", ".join(f"{x:.2f}" for x in per) + f"); {of_medians:.2f}{verdict}")
    return 0


def main(argv):
    cmds = {"ours": (ours, 7), "ours-bench": (ours_bench, 4), "torch": (torch_run, 4),
            "report": (report, None)}
    if len(argv) < 2 or argv[1] not in cmds:
        print(__doc__, file=sys.stderr)
        return 2
    fn, n = cmds[argv[1]]
    args = argv[2:]
    if fn is report:
        return report(args[0], args[1:]) if args else 2
    if fn is torch_run and len(args) == 6:
        return torch_run(*args)
    if len(args) != n:
        print(__doc__, file=sys.stderr)
        return 2
    return fn(*args)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
