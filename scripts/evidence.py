"""Evidence for the paper's claims, with the real engine and the trainer on the default model.

    make mismatch            # python scripts/evidence.py mismatch: log-prob gap by trainer probability, per rho
    make compare             # python scripts/evidence.py compare: plain GRPO vs TIS vs MIS vs DVP training runs
    make compare ARGS="--engine-noise 1.0"   # the same with the engine's mismatch amplified by a known delta

mismatch: samples a fixed prompt set (the held-out arithmetic problems, 4 completions each) at
rho in {0, 1e-3, 1e-2, 1e-1}, recomputes every sampled token's log-prob in the trainer (fp32) over
the trainer's own safe set, and reports dvp.mismatch_stats per rho: a markdown table
(figures/mismatch[-noiseD][-float32].md) and a figure of |log pi - log mu| against p with the
(1 - p) shape.

compare: runs train.py once per arm with the same seed and budget, each in its own folder under
runs/compare[-noiseD][-float32][-seedS]/ (an interrupted arm resumes, a complete one is not
re-run, and train.py refuses to resume an arm with other settings: delete that folder to change
them),
then plots reward, held-out sampled accuracy, gradient norm, K3 KL and the bias bound against the
step, all arms on one panel per metric (figures/compare[-noiseD][-float32][-seedS].png), and
writes a summary table. -float32 marks runs whose engine ran in float32 (--engine-dtype; auto
picks it on CPUs without AVX-512, where vLLM's bf16 is slow). Arguments evidence.py does not
know are passed to every arm's train.py (e.g. --prompts-per-step 4).
Plots need matplotlib, which the make targets install into .venv.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import dvp  # noqa: E402
import train  # noqa: E402

RHOS = (0.0, 1e-3, 1e-2, 1e-1)


def dtype_of(args):
    return train.engine_dtype(train.Args(engine_dtype=args.engine_dtype), torch.device("cpu"))


def tag_of(args):
    """File-name suffix: the engine noise, and the engine dtype where it is not bfloat16."""
    dtype = dtype_of(args)
    return (f"-noise{args.engine_noise:g}" if args.engine_noise else "") + ("" if dtype == "bfloat16" else f"-{dtype}")


def measure(rho, llm, tok, model, prompts, n, max_tokens):
    """Sample at min_p = rho; return the sampled tokens' trainer and engine log-probs, flat."""
    rollouts = train.generate(llm, prompts, n=n, temperature=1.0, min_p=rho, max_tokens=max_tokens)
    cols = {k: [] for k in ("logp", "plain", "engine", "in_set", "eps", "seq")}
    with torch.no_grad():
        for g in range(0, len(prompts), 8):  # 8 prompts (8 * n sequences) per forward
            rs = rollouts[g * n:(g + 8) * n]
            ps, cs = [r[0] for r in rs[::n]], [r[1] for r in rs]
            (logp, in_set, eps), _ = train.trainer_logprobs(model, ps, cs, n, rho)
            (plain, _, _), _ = train.trainer_logprobs(model, ps, cs, n, 0.0)
            m = train.pad(cs, 0)[1]
            for k, x in (("logp", logp), ("in_set", in_set), ("eps", eps), ("plain", plain)):
                cols[k].append(x[m])
            cols["engine"].append(torch.tensor([lp for r in rs for lp in r[2]]))
            cols["seq"].append(torch.arange(g * n, g * n + len(rs)).repeat_interleave(m.sum(-1)))
    return {k: torch.cat(v) for k, v in cols.items()}


def mismatch(args):
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    tag = tag_of(args)
    targs = train.Args(engine_noise=args.engine_noise, max_new_tokens=args.max_new_tokens, engine_dtype=args.engine_dtype)
    path = train.resolve_model(targs)
    tok, model = train.load_trainer_model(path, torch.device("cpu"))
    _, heldout = train.arithmetic_task()
    prompts = [train.chat(tok, q) for q, _ in heldout[:args.prompts]]
    llm = train.start_engine(path, targs, torch.device("cpu"), max_model_len=192 + args.max_new_tokens, seed=0)
    train.sync_weights(llm, model)
    dtype = dtype_of(args)
    t0, rows, per_rho = time.time(), [], {}
    for rho in RHOS:
        d = measure(rho, llm, tok, model, prompts, args.n, args.max_new_tokens)
        # per-sequence (B, T) views for mismatch_stats: one row per sequence
        B = int(d["seq"].max()) + 1
        T = int(torch.bincount(d["seq"]).max())
        pos = torch.cat([torch.arange(c) for c in torch.bincount(d["seq"], minlength=B).tolist()])
        grid = lambda x, fill=0.0: torch.full((B, T), fill, dtype=x.dtype).index_put_((d["seq"], pos), x)
        mask = grid(torch.ones_like(d["in_set"]), False)
        s = dvp.mismatch_stats(grid(d["logp"]), grid(d["engine"].to(d["logp"].dtype)), mask, grid(d["in_set"], False), grid(d["eps"]))
        per_rho[rho] = d
        rows.append((rho, s, len(d["logp"])))
        print(f"rho={rho:g}: {len(d['logp'])} tokens, K3 KL {s['kl_k3']:.2e}, out-of-set {s['out_of_set_frac']:.2e}", flush=True)
    wall = time.time() - t0
    buckets = [f"{lo:g}_{hi:g}" for lo, hi in zip(dvp.BUCKETS[:-1], dvp.BUCKETS[1:])]
    lines = [f"Mismatch between vLLM ({dtype}) and the trainer (float32), SmolLM2-135M-Instruct, {len(prompts)} prompts x {args.n} samples x <= {args.max_new_tokens} tokens"
             + (f", engine noise delta = {args.engine_noise:g}" if args.engine_noise else "") + f". Wall time {wall:.0f} s.", "",
             "mean \\|log pi_S - log mu_S\\| by trainer probability bucket (token count in brackets), then the summary statistics:", "",
             "| rho | tokens | " + " | ".join(f"p in [{b.replace('_', ', ')})" for b in buckets) + " | max | K3 KL | chi2 | out-of-set | mean eps | bias bound/seq |",
             "|---" * (len(buckets) + 8) + "|"]
    for rho, s, n in rows:
        cells = [f"{s['gap_' + b]:.4f} ({int(s['count_' + b])})" if s['count_' + b] else "-" for b in buckets]
        lines.append(f"| {rho:g} | {n} | " + " | ".join(cells) + f" | {s['mismatch_max']:.3f} | {s['kl_k3']:.2e} | {s['chi2']:.2e} | "
                     f"{s['out_of_set_frac']:.2e} | {s['pruned_mass_mean']:.2e} | {s['bias_bound']:.3f} |")
    table = "\n".join(lines)
    print(table)
    (out / f"mismatch{tag}.md").write_text(table + "\n")
    plot_mismatch(per_rho, out / f"mismatch{tag}.png", args.engine_noise)


def plot_mismatch(per_rho, path, noise):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    d = per_rho[0.0]
    p, gap = d["plain"].exp().double(), (d["logp"].double() - d["engine"].double()).abs()
    ax.scatter(p, gap, s=2, alpha=0.15, color="gray", label="sampled tokens, rho = 0")
    edges = torch.logspace(-6, 0, 19, dtype=torch.float64)
    for rho, d in per_rho.items():
        ok = d["in_set"]
        p, gap = d["plain"][ok].exp().double(), (d["logp"][ok].double() - d["engine"][ok].double()).abs()
        idx = torch.bucketize(p, edges)
        xs, ys = [], []
        for b in range(1, len(edges)):
            sel = idx == b
            if sel.sum() >= 5:
                xs.append(float(p[sel].mean())), ys.append(float(gap[sel].mean()))
        ax.plot(xs, ys, marker="o", ms=3, label=f"binned mean, rho = {rho:g}")
    d = per_rho[0.0]
    p0 = d["plain"].exp().double()
    c = float((d["logp"].double() - d["engine"].double()).abs()[p0 < 1e-2].mean())
    grid = torch.logspace(-6, 0, 200, dtype=torch.float64)
    ax.plot(grid, c * (1 - grid), "k--", label=f"{c:.3f} (1 - p)")
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_ylim(1e-5, None)
    ax.set_xlabel("trainer probability p of the sampled token (unpruned)")
    ax.set_ylabel("|log pi - log mu|")
    ax.set_title("Engine vs trainer log-prob gap" + (f" (engine noise {noise:g})" if noise else ""))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


ARMS = {"plain GRPO": ("0", "none"), "TIS (C=2)": ("0", "tis"), "MIS (C=3)": ("0", "mis"), "DVP (rho=1e-3)": ("1e-3", "none")}


# Per-arm budget beyond --steps: half the default batch (4 prompts x 8 samples), so that four arms
# fit in about half an hour on a 2-core CPU. Later arguments (passed through) override it.
BUDGET = ("--prompts-per-step", "4")


def compare(args):
    tag = tag_of(args) + (f"-seed{args.seed}" if args.seed else "")
    runs = ROOT / "runs" / f"compare{tag}"
    t0 = time.time()
    for name, (rho, corr) in ARMS.items():
        if args.arms and name.split()[0].lower() not in args.arms:
            continue
        d = runs / name.split()[0].lower()
        recs = read(d / "metrics.jsonl")
        cmd = [sys.executable, str(ROOT / "train.py"), "--out", str(d), "--steps", str(args.steps), "--min-p", rho,
               "--correction", corr, "--seed", str(args.seed), "--engine-noise", str(args.engine_noise),
               "--eval-every", str(args.eval_every), "--engine-dtype", args.engine_dtype, *BUDGET, *args.train_args]
        if (d / "checkpoint.pt").exists():  # train.py refuses other settings, and does nothing if it is complete
            cmd.append("--resume")
        elif recs:  # stopped before its first checkpoint: keep what it wrote, start the arm again
            (d / "metrics.jsonl").rename(d / f"metrics.jsonl.incomplete-{int(time.time())}")
        print(f"{name}: {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, check=True)
    note = f"Wall time of this command: {(time.time() - t0) / 60:.1f} min (arms that were already complete take seconds)."
    title = f"engine noise delta = {args.engine_noise:g}" if args.engine_noise else f"natural {dtype_of(args)} engine / float32 trainer mismatch"
    plot_compare(runs, Path(args.out) / f"compare{tag}.png", Path(args.out) / f"compare{tag}.md", title, note)


def read(path):
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def latest(recs, kind):
    """The last record of each step (a resumed run may repeat steps)."""
    by_step = {r["step"]: r for r in recs if r.get("kind") == kind}
    return [by_step[s] for s in sorted(by_step)]


def plot_compare(runs, png, md, title, note):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics = [("reward", "train reward (5-step mean)"), ("sampled_acc", "held-out sampled accuracy"),
               ("greedy_acc", "held-out greedy accuracy"), ("grad_norm", "gradient norm"),
               ("kl_k3", "K3 KL(mu || pi)"), ("bias_bound", "bias bound per sequence")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    lines = ["| arm | steps | held-out sampled acc, own sampler (start -> end) | same, unpruned sampler | greedy acc (start -> end) "
             "| mean K3 KL | mean grad norm | mean out-of-set | mean bias bound | time in steps (gen + train + sync; evals excluded) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in ARMS:
        recs = read(runs / name.split()[0].lower() / "metrics.jsonl")
        tr, ev = latest(recs, "train"), latest(recs, "eval")
        if not tr:
            continue
        for ax, (key, panel) in zip(axes.flat, metrics):
            src = ev if key.endswith("_acc") else tr
            xs, ys = [r["step"] for r in src], [r[key] for r in src]
            if key == "reward":
                ys = [sum(ys[max(0, i - 4):i + 1]) / len(ys[max(0, i - 4):i + 1]) for i in range(len(ys))]
            ax.plot(xs, ys, label=name, marker="o" if key.endswith("_acc") else None, ms=3)
            ax.set_title(panel, fontsize=10), ax.set_xlabel("step")
        mean = lambda k: sum(r[k] for r in tr) / len(tr)
        unpruned = lambda e: e.get("sampled_acc_unpruned", e["sampled_acc"])
        wall = sum(r["time_generate"] + r["time_train"] + r["time_sync"] for r in tr)
        lines.append(f"| {name} | {tr[-1]['step']} | {ev[0]['sampled_acc']:.3f} -> {ev[-1]['sampled_acc']:.3f} | "
                     f"{unpruned(ev[0]):.3f} -> {unpruned(ev[-1]):.3f} | "
                     f"{ev[0]['greedy_acc']:.3f} -> {ev[-1]['greedy_acc']:.3f} | {mean('kl_k3'):.2e} | {mean('grad_norm'):.3f} | "
                     f"{mean('out_of_set_frac'):.1e} | {mean('bias_bound'):.3f} | {wall / 60:.1f} min |")
    axes.flat[4].set_yscale("log")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"Same seed and budget per arm, {title}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    lines += ["", note]
    md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {png} and {md}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["mismatch", "compare"])
    p.add_argument("--engine-noise", type=float, default=0.0, help="delta of the engine logit noise (train.py --engine-noise)")
    p.add_argument("--engine-dtype", default="auto", help="vLLM's dtype (train.py --engine-dtype); not bfloat16 goes into the file names")
    p.add_argument("--out", default=str(ROOT / "figures"), help="where figures and tables go")
    p.add_argument("--prompts", type=int, default=64, help="mismatch: prompts")
    p.add_argument("--n", type=int, default=4, help="mismatch: samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64, help="mismatch: completion length cap")
    p.add_argument("--steps", type=int, default=20, help="compare: steps per arm")
    p.add_argument("--eval-every", type=int, default=10, help="compare: held-out evaluation interval")
    p.add_argument("--seed", type=int, default=0, help="compare: the seed every arm uses")
    p.add_argument("--arms", nargs="*", help="compare: run only these arms (plain, tis, mis, dvp)")
    args, args.train_args = p.parse_known_args()
    if args.train_args and args.what != "compare":
        p.error(f"unrecognized arguments: {' '.join(args.train_args)}")
    Path(args.out).mkdir(exist_ok=True)
    mismatch(args) if args.what == "mismatch" else compare(args)


if __name__ == "__main__":
    main()
