# Side-by-side table of the window means of two or more kd_train log.jsonl files (scripts/multi_gpu.sh):
# one row per logged step and loss term, with the largest relative gap to the first file.
#   python3 benchmarks/dp_compare.py NAME1 LOG1 NAME2 LOG2 ...
import json, sys
names = sys.argv[1::2]; paths = sys.argv[2::2]
logs = [[json.loads(l) for l in open(p)] for p in paths]
keys = ["total", "lm", "kd", "feature", "route", "z_loss"]
print("| step | term | " + " | ".join(names) + " | max rel. gap |")
print("|---:|---|" + "---:|" * len(names) + "---:|")
worst = 0
for rows in zip(*logs):
    for k in keys:
        if k not in rows[0]: continue
        v = [r[k]["mean"] for r in rows]
        gap = max(abs(x - v[0]) for x in v) / max(abs(v[0]), 1e-12)
        worst = max(worst, gap)
        print(f"| {rows[0]['step']} | {k} | " + " | ".join(f"{x:.6g}" for x in v) + f" | {gap:.2e} |")
print(f"worst relative gap: {worst:.2e}")
