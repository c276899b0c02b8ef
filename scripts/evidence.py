"""Evidence for the paper's claims, with the real engine and the trainer on the default model.

    make mismatch ARGS="--engine-kv-dtype fp8"   # evidence.py mismatch: the log-prob gap, per rho
    make compare ARGS="--engine-kv-dtype fp8"    # evidence.py compare: five arms x seeds of train.py
    make compare ARGS="--preset long"            # claim (c) over 80 steps: FP8 KV, 4 arms x 3 seeds, ~3 h
    make sweep                                   # evidence.py sweep: plain GRPO at engine noise 0 1 2 4, seed 0
    make compare ARGS="--preset stress --engine-noise 2"   # claim (c) where plain GRPO degrades: 6 arms x 3 seeds
    python scripts/evidence.py plot --engine-kv-dtype fp8   # redraw a compare from the runs on disk

mismatch: samples a fixed prompt set (the held-out arithmetic problems, 4 completions each) at
each rho (--rhos, default 0 1e-3 1e-2 1e-1), recomputes every sampled token's log-prob in the
trainer (fp32) over the trainer's own safe set, and writes per rho dvp.mismatch_stats and what
the seq-rs and geo filters would drop (figures/mismatch{tag}.md, .png), and the cumulative
log-ratio along the completion (figures/drift{tag}.json; figures/drift.png from every drift file).

compare: runs train.py for each arm (plain GRPO, TIS, seq-rs, geo, DVP) and each seed (--seeds,
default 0 1 2) with the budget BUDGET, each in runs/compare{tag}/seed{S}/{arm}/ (an interrupted
run resumes, a complete one is not re-run, and train.py refuses to resume a run with other
settings: delete that folder to change them); then a table (mean and min-max over seeds, a
Student-t 95 % interval from 4 seeds on) and one panel per metric (figures/compare{tag}.md, .png).
--preset long (claim (c) over 80 steps; LONG below): FP8 KV cache, arms plain, DVP at 1e-2, geo,
DVP at 1e-3, held-out evaluation every 20 steps, the bf16 trainer where it is fast; a finished
run's checkpoint is deleted (its records are what the table reads, and git keeps them).
{tag}: -long for that preset, -kvfp8 for an FP8 KV cache, -noiseD for --engine-noise D, -float32
for a float32 engine (--engine-dtype; auto picks it on CPUs without AVX-512, where vLLM's bf16 is
slow). Arguments evidence.py does not know are passed to every run's train.py. Plots need
matplotlib, which the make targets install into .venv.
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
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")   # as train.py: the trainer next to the engine


def dtype_of(args):
    return train.engine_dtype(train.Args(engine_dtype=args.engine_dtype), DEVICE)


def tag_of(args):
    """File-name suffix: the long preset, the engine noise, the KV-cache dtype where it is not auto, and
    the engine dtype where it is not bfloat16."""
    dtype = dtype_of(args)
    return ((f"-{args.preset}" if args.preset in PRESETS else "") +
            (f"-noise{args.engine_noise:g}" if args.engine_noise else "") +
            ("" if args.engine_kv_dtype == "auto" else f"-kv{args.engine_kv_dtype}") +
            ("" if dtype == "bfloat16" else f"-{dtype}"))


def regime_of(args, saved=None):
    """The mismatch regime in words, for titles: as the runs recorded it in their args.json (`saved`)
    where given, else as these arguments make it on this machine."""
    saved, extra = saved or {}, getattr(args, "train_args", [])
    dtype = (saved.get("used", {}).get("engine_dtype")                     # runs before "used" was recorded:
             or (saved["engine_dtype"] if saved.get("engine_dtype", "auto") != "auto" else dtype_of(args)))  # here's
    kv_dtype, noise = saved.get("engine_kv_dtype", args.engine_kv_dtype), saved.get("engine_noise", args.engine_noise)
    trainer = saved.get("trainer_dtype") or (extra[extra.index("--trainer-dtype") + 1] if "--trainer-dtype" in extra
                                              else "float32")
    kv = "" if kv_dtype == "auto" else f", {kv_dtype} KV cache"
    return f"vLLM {dtype}{kv}" + (f", engine noise delta = {noise:g}" if noise else "") + f" / {trainer} trainer"


def saved_settings(runs):
    """The settings the runs in `runs` share (their args.json), or {} when there is none. Runs that
    differ in what the title names raise: a table must not mix regimes."""
    found = [json.loads(p.read_text()) for p in sorted(runs.glob("seed*/*/args.json"))]
    keys = ("engine_kv_dtype", "engine_noise", "trainer_dtype", "used")
    mixed = [k for k in keys if len({json.dumps(x[k]) for x in found if k in x}) > 1]   # older runs lack "used"
    if mixed:
        raise SystemExit(f"{runs}: the runs differ in {mixed} (see their args.json); one table per regime")
    return found[0] if found else {}


def measure(rho, llm, tok, model, prompts, n, max_tokens, answers):
    """Sample at min_p = rho; return the sampled tokens' trainer and engine log-probs, flat, and each
    problem's accuracy over its n samples ("acc", one per prompt)."""
    rollouts = train.generate(llm, prompts, n=n, temperature=1.0, min_p=rho, max_tokens=max_tokens)
    acc = torch.tensor(train.score([r.text for r in rollouts], [a for a in answers for _ in range(n)])).view(-1, n)
    cols = {k: [] for k in ("logp", "plain", "engine", "in_set", "pruned_mass", "seq")}
    with torch.no_grad():
        for g in range(0, len(prompts), 8):  # 8 prompts (8 * n sequences) per forward
            rs = rollouts[g * n:(g + 8) * n]
            ps, cs = [r.prompt_ids for r in rs[::n]], [r.completion_ids for r in rs]
            (logp, in_set, pruned), _ = train.trainer_logprobs(model, ps, cs, n, rho)
            (plain, _, _), _ = train.trainer_logprobs(model, ps, cs, n, 0.0)
            m = train.pad(cs, 0)[1]
            for k, x in (("logp", logp), ("in_set", in_set), ("pruned_mass", pruned), ("plain", plain)):
                cols[k].append(x.cpu()[m])
            cols["engine"].append(torch.tensor([lp for r in rs for lp in r.engine_logp]))
            cols["seq"].append(torch.arange(g * n, g * n + len(rs)).repeat_interleave(m.sum(-1)))
    return {**{k: torch.cat(v) for k, v in cols.items()}, "acc": acc.double().mean(1)}


def mismatch(args):
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    tag = tag_of(args)
    targs = train.Args(engine_noise=args.engine_noise, max_new_tokens=args.max_new_tokens,
                       engine_dtype=args.engine_dtype, engine_kv_dtype=args.engine_kv_dtype)
    path = train.resolve_model(targs)
    tok, model = train.load_trainer_model(path, DEVICE)
    _, heldout = train.arithmetic_task()
    prompts = [train.chat(tok, q) for q, _ in heldout[:args.prompts]]
    llm = train.start_engine(path, targs, DEVICE, max_model_len=192 + args.max_new_tokens, seed=0)
    train.sync_weights(llm, model)
    t0, rows, per_rho, drift = time.time(), [], {}, {}
    for rho in args.rhos:
        d = measure(rho, llm, tok, model, prompts, args.n, args.max_new_tokens, [a for _, a in heldout[:args.prompts]])
        # per-sequence (B, T) views for mismatch_stats: one row per sequence
        B = int(d["seq"].max()) + 1
        T = int(torch.bincount(d["seq"]).max())
        pos = torch.cat([torch.arange(c) for c in torch.bincount(d["seq"], minlength=B).tolist()])
        grid = lambda x, fill=0.0: torch.full((B, T), fill, dtype=x.dtype).index_put_((d["seq"], pos), x)
        mask = grid(torch.ones_like(d["in_set"]), False)
        s = dvp.mismatch_stats(grid(d["logp"]), grid(d["engine"].to(d["logp"].dtype)), mask, grid(d["in_set"], False),
                               grid(d["pruned_mass"]))
        per_rho[rho] = d
        # what --correction geo and seq-rs would drop, over tokens in the trainer's safe set (as train.py); the geo
        # statistic is verl's seq_mean_k1, exp(mean_t log mu - log pi) (dvp.geo_mask), whose quantiles we report
        ok = mask & grid(d["in_set"], False)
        logp, engine = grid(d["logp"].double()), grid(d["engine"].double())
        geo = dvp.geo_statistic(logp, engine, ok).exp()
        s["geo_q"] = [float(x) for x in
                      torch.quantile(geo, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=geo.dtype))]
        s["geo_rejected"] = float((~dvp.geo_mask(logp, engine, ok, *train.GEO_INTERVAL)).double().mean())
        s["seq_rs_rejected"] = float((~dvp.seq_reject_mask(logp, engine, ok, cap=3.0)).double().mean())
        drift[rho] = cumulative_log_ratio(grid(d["engine"].double() - d["logp"].double()), mask,
                                          grid(d["in_set"], False))
        diff = d["acc"] - per_rho[0.0]["acc"] if 0.0 in per_rho else torch.zeros_like(d["acc"])  # rho = 0 runs first
        s["acc"], s["bias_measured"], s["bias_measured_se"] = (float(d["acc"].mean()), float(diff.mean()),
                                                               float(diff.std() / len(diff) ** 0.5))
        rows.append((rho, s, len(d["logp"])))
        print(f"rho={rho:g}: {len(d['logp'])} tokens, K3 KL {s['kl_k3']:.2e}, "
              f"out-of-set {s['out_of_set_frac']:.2e}", flush=True)
    wall = time.time() - t0
    buckets = [f"{lo:g}_{hi:g}" for lo, hi in zip(dvp.BUCKETS[:-1], dvp.BUCKETS[1:])]
    cmd = "make mismatch" + (f' ARGS="{" ".join(sys.argv[2:])}"' if sys.argv[2:] else "")
    lines = [f"`{cmd}`: mismatch between {regime_of(args)}, SmolLM2-135M-Instruct, "
             f"{len(prompts)} held-out prompts (split by operand pair) x {args.n} samples x <= {args.max_new_tokens} "
             "tokens. "
             f"Wall time {wall:.0f} s (sampling and trainer log-probs, engine start excluded).", "",
             "mean \\|log pi_S - log mu_S\\| by trainer probability bucket (token count in brackets), "
             "then the summary statistics:", "",
             "| rho | tokens | " + " | ".join(f"p in [{b.replace('_', ', ')})" for b in buckets)
             + " | max | K3 KL | chi2 | out-of-set tokens / seqs with one | mean eps | bias bound/seq exact / sum "
             "| held-out acc (minus at rho = 0, +- s.e.) "
             f"| seqs rejected by geo {list(train.GEO_INTERVAL)} / by seq-RS [1/3, 3] | "
             "geo statistic exp(mean log mu - log pi), quantiles 5/25/50/75/95 % |",
             "|---" * (len(buckets) + 11) + "|"]
    for rho, s, n in rows:
        cells = [f"{s['gap_' + b]:.4f} ({int(s['count_' + b])})" if s['count_' + b] else "-" for b in buckets]
        lines.append(f"| {rho:g} | {n} | " + " | ".join(cells)
                     + f" | {s['mismatch_max']:.3f} | {s['kl_k3']:.2e} | {s['chi2']:.2e} | "
                     f"{s['out_of_set_frac']:.2e} / {s['seq_out_of_set_frac']:.3f} | {s['pruned_mass_mean']:.2e} | "
                     f"{s['bias_bound']:.3f} / {s['bias_bound_sum']:.3f} | "
                     f"{s['acc']:.3f} ({s['bias_measured']:+.3f} +- {s['bias_measured_se']:.3f}) | "
                     f"{s['geo_rejected']:.3f} / {s['seq_rs_rejected']:.3f} | "
                     f"{' '.join(f'{q:.3f}' for q in s['geo_q'])} |")
    table = "\n".join(lines)
    print(table)
    (out / f"mismatch{tag}.md").write_text(table + "\n")
    plot_mismatch(per_rho, out / f"mismatch{tag}.png", regime_of(args))
    (out / f"drift{tag}.json").write_text(json.dumps({"regime": regime_of(args), "command": cmd, "wall_s": round(wall),
                                                      "rho": {f"{r:g}": v for r, v in drift.items()}}) + "\n")
    plot_drift(out)


def cumulative_log_ratio(r, real, ok, min_n=20):
    """Claim (b): c_t = sum_{t' <= t} (log mu - log pi) along each completion (tokens outside the
    trainer's safe set, ok = False, count 0). r, real, ok (B, T) -> per position t (while >= min_n
    sequences are that long): mean of c_t over sequences, its 95 % half-interval (1.96 s.e.), n."""
    c = torch.where(ok, r, 0.0).cumsum(-1)
    out = {"mean": [], "half": [], "n": []}
    for t in range(r.shape[1]):
        x = c[real[:, t], t]                                 # the sequences that reach position t
        if len(x) < min_n:
            break
        out["mean"].append(float(x.mean())), out["half"].append(float(1.96 * x.std() / len(x) ** 0.5))
        out["n"].append(len(x))
    return out


def plot_drift(out):
    """figures/drift.png from every figures/drift*.json: mean cumulative log mu - log pi against the
    position, one line and 95 % band per regime and rho."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    notes = []
    for f in sorted(Path(out).glob("drift*.json")):
        d = json.loads(f.read_text())
        for rho, v in d["rho"].items():
            t = torch.arange(1, len(v["mean"]) + 1)
            m, h = torch.tensor(v["mean"]), torch.tensor(v["half"])
            line, = ax.plot(t, m, label=f"{d['regime'].split(' / ')[0]}, rho = {rho}")
            ax.fill_between(t, m - h, m + h, alpha=0.2, color=line.get_color())
        notes.append(f"{d['command']} ({d['wall_s'] / 60:.0f} min)")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("position t in the completion")
    ax.set_ylabel("mean of sum_{t' <= t} (log mu - log pi)")
    ax.set_title("Does the log-ratio drift along a sequence? (95 % band over sequences)", fontsize=10)
    ax.legend(fontsize=7)
    fig.text(0.01, 0.005, "; ".join(notes), fontsize=6)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(Path(out) / "drift.png", dpi=120)
    plt.close(fig)
    print(f"wrote {Path(out) / 'drift.png'}")


def plot_mismatch(per_rho, path, regime):
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
    ax.set_title(f"Engine vs trainer log-prob gap: {regime}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


# seq-rs is verl's sequence-level rejection (seq_sum_k1, [1/3, 3]; dvp.seq_reject_mask). The 15-step tables ran it
# under the name "mis" (label "MIS (C=3)"); their run folders are not in the repository (figures/README.md).
ARMS = {"plain": ("plain GRPO", "0", "none"), "tis": ("TIS (C=2)", "0", "tis"),
        "seq-rs": ("seq-RS [1/3, 3]", "0", "seq-rs"),
        "geo": ("geo mask [%g, %g]" % train.GEO_INTERVAL, "0", "geo"), "dvp": ("DVP (rho=1e-3)", "1e-3", "none"),
        "dvp2": ("DVP (rho=1e-2)", "1e-2", "none"), "dvp1": ("DVP (rho=0.1)", "0.1", "none"),
        "dvp2seq": ("DVP-sequence (rho=1e-2)", "1e-2", "none", "sequence"),
        "dvp1seq": ("DVP-sequence (rho=0.1)", "0.1", "none", "sequence")}
DEFAULT_ARMS = ["plain", "tis", "seq-rs", "geo", "dvp"]

# --preset long (claim (c) over a longer horizon): the FP8 KV cache, 80 steps, held-out evaluation every 20,
# the four arms that matter there (figures/drift.png: rho = 1e-3 barely changes the FP8 drift, 1e-2 cuts it to a
# third; so 1e-2 runs second), the bf16 trainer where it is fast (1.8x), at the lr where make train used to fall
# back (BUDGET). One run takes 10-15 min on 2 cores: 4 arms x 3 seeds took 3 h 02 min, resumable.
LONG = dict(steps=80, eval_every=20, arms=["plain", "dvp2", "geo", "dvp"], engine_kv_dtype="fp8")

# --preset stress (claim (c) where plain GRPO can break): the long preset's budget with the bf16 KV cache and
# engine noise delta (--engine-noise: the paper's own assumption, every engine logit off by at most delta),
# held-out evaluation every 10 steps. `evidence.py sweep` runs plain GRPO on seed 0 at each delta of --deltas
# first; the regime is chosen on those runs alone, and then `make compare ARGS="--preset stress --engine-noise D"`
# runs the arms below at that delta (plain GRPO's seed-0 run is the sweep's, reused). Chosen so: delta = 2 (the
# smallest that degraded plain GRPO, figures/sweep-stress.md), and there `make mismatch ARGS="--engine-noise 2"`
# shows rho = 0.1 halving the drift (6.8 -> 3.1 nats at t = 20; 1e-2: 5.1, 1e-3: 6.2), hence DVP at 0.1 (token- and
# sequence-level out-of-set handling), the default 1e-3, the geo mask and TIS.
STRESS = dict(steps=80, eval_every=10, arms=["plain", "dvp1", "dvp", "dvp1seq", "geo", "tis"], engine_kv_dtype="auto")
PRESETS = {"long": LONG, "stress": STRESS}

# Per-run budget beyond --steps: 4 prompts x 8 samples per step, held-out evaluation at the start
# and the end only, so that 5 arms x 3 seeds fit in about 90 minutes on a 2-core CPU (each run:
# ~40 s start, 2 evaluations of ~40 s, ~12-17 s per step), and the learning rate the committed
# compare ran with (train.py's default then), so that its runs resume and extend as they are.
# Later arguments (passed through) override it.
BUDGET = ("--prompts-per-step", "4", "--lr", "2e-5")


def run_arms(args, runs, t0):
    """Run (or resume, or skip when finished) train.py for every seed and arm into runs/seedS/ARM/."""
    for seed in args.seeds:
        for arm in args.arms:
            _, rho, corr, *rest = ARMS[arm]
            d = runs / f"seed{seed}" / arm
            recs = read(d / "metrics.jsonl")
            if finished(recs, args.steps):
                continue
            last = train.latest(recs, "train")
            if last and last[-1]["step"] >= 10 and not (d / "checkpoint.pt").exists():
                raise SystemExit(f"{d} stopped at step {last[-1]['step']} and has no checkpoint (the long and "
                                 "stress presets delete a finished run's): it cannot be extended; delete the folder "
                                 "to rerun it")
            cmd = [sys.executable, str(ROOT / "train.py"), "--out", str(d), "--steps", str(args.steps), "--min-p", rho,
                   "--correction", corr, "--out-of-set", rest[0] if rest else "token", "--seed", str(seed),
                   "--engine-noise", str(args.engine_noise), "--eval-every", str(args.eval_every or args.steps),
                   "--engine-dtype", args.engine_dtype, "--engine-kv-dtype", args.engine_kv_dtype, *BUDGET,
                   *args.train_args]
            if recs:  # train.py refuses other settings; without a checkpoint yet it starts again from step 0
                cmd.append("--resume")
            print(f"[{time.time() - t0:6.0f} s] seed {seed}, {ARMS[arm][0]}: {' '.join(cmd[2:])}", flush=True)
            subprocess.run(cmd, check=True)
            if args.preset in PRESETS:                   # the metrics are what the tables read; 1.6 GB each
                (d / "checkpoint.pt").unlink(missing_ok=True)


def compare(args):
    tag = tag_of(args)
    runs = ROOT / "runs" / f"compare{tag}"
    t0 = time.time()
    run_arms(args, runs, t0)
    cmd = "make compare" + (f' ARGS="{" ".join(sys.argv[2:])}"' if sys.argv[2:] else "")
    note = (f"`{cmd}`: wall time {(time.time() - t0) / 60:.0f} min on {platform_note()} "
            "(runs that were already complete take seconds; see each run's time_* records).")
    (runs / "note.md").write_text(note + "\n")                   # `evidence.py plot` reuses it
    summarize_compare(args)


def sweep(args):
    """Plain GRPO on each seed of --seeds at each engine noise delta of --deltas (the stress preset's
    budget), then one table of held-out accuracy over the evaluations per delta: figures/sweep{tag}.md."""
    t0 = time.time()
    args.arms = ["plain"]
    for delta in args.deltas:
        args.engine_noise = delta
        run_arms(args, ROOT / "runs" / f"compare{tag_of(args)}", t0)
    wall = time.time() - t0
    args.engine_noise = 0.0
    tag = tag_of(args)
    lines = sweep_table(args)
    cmd = "python scripts/evidence.py " + " ".join(sys.argv[1:])
    lines += ["", f"`{cmd}`: wall time {wall / 60:.0f} min on {platform_note()} (runs already complete take seconds)."]
    (Path(args.out) / f"sweep{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def sweep_table(args):
    """Markdown lines: per delta and seed (those of --seeds, and any other seed with a run on disk at that
    delta), held-out greedy and sampled accuracy at every evaluation, best-to-end drops,
    train reward (5-step means) at the start, best and end, and mean K3 KL."""
    evals = list(range(0, args.steps + 1, args.eval_every))
    lines = [f"Plain GRPO under engine noise delta, {args.steps} steps x 4 prompts x 8 samples, lr 2e-5, "
             "bf16 KV cache, bf16 trainer (float32 LM head), "
             "held-out split by operand pair (64 problems x 4 samples). Accuracy at steps " + ", ".join(map(str, evals))
             + "; drop = best minus end.", "",
             "| delta | seed | greedy acc | greedy drop | sampled acc (unpruned) | sampled drop | train reward "
             "(5-step mean) start / best / end | mean K3 KL, steps 1-10 / 71-80 | minutes |", "|---" * 9 + "|"]
    for delta in args.deltas:
        args.engine_noise = delta
        runs = ROOT / "runs" / f"compare{tag_of(args)}"
        for seed in sorted(set(args.seeds) | set(seeds_on_disk(runs))):
            recs = read(runs / f"seed{seed}" / "plain" / "metrics.jsonl")
            if not finished(recs, args.steps):
                lines.append(f"| {delta:g} | {seed} | (not finished) |||||||")
                continue
            tr, ev = train.latest(recs, "train"), train.latest(recs, "eval")
            g, sa = [e["greedy_acc"] for e in ev], [e["sampled_acc_unpruned"] for e in ev]
            r = smooth([x["reward"] for x in tr], 5)
            k3 = lambda xs: sum(x["kl_k3"] for x in xs) / len(xs)  # noqa: E731
            lines.append(f"| {delta:g} | {seed} | {' '.join(f'{x:.3f}' for x in g)} | {max(g) - g[-1]:.3f} | "
                         f"{' '.join(f'{x:.3f}' for x in sa)} | {max(sa) - sa[-1]:.3f} | "
                         f"{r[4]:.3f} / {max(r[4:]):.3f} / {r[-1]:.3f} | {k3(tr[:10]):.1e} / {k3(tr[-10:]):.1e} | "
                         f"{run_summary(recs)['minutes']:.0f} |")
    return lines


def platform_note():
    import os
    return f"{os.cpu_count()} CPU cores" + (" with AVX512-BF16" if "avx512_bf16" in train.cpu_flags() else "")


def read(path):
    """A run's records (train.read_jsonl: [] without the file; a torn last line is skipped, with a warning)."""
    return train.read_jsonl(path)


def smooth(ys, k=3):
    """Trailing k-step mean (the train reward of one step is 32 samples: noisy)."""
    return [sum(ys[max(0, i - k + 1):i + 1]) / len(ys[max(0, i - k + 1):i + 1]) for i in range(len(ys))]


def run_summary(recs):
    """One run's numbers for the compare table."""
    tr, ev = train.latest(recs, "train"), train.latest(recs, "eval")
    r = smooth([x["reward"] for x in tr])
    mean = lambda k: sum(x.get(k, 0.0) for x in tr) / len(tr)
    acc = {x["step"]: x.get("sampled_acc_unpruned", x["sampled_acc"]) for x in ev}
    return {"sampled_acc": ev[-1]["sampled_acc"], "acc_at": acc, "eval_drop": max(acc.values()) - acc[max(acc)],
            "unpruned_acc": ev[-1].get("sampled_acc_unpruned", ev[-1]["sampled_acc"]),
            "greedy_acc": ev[-1]["greedy_acc"],
            "start_acc": ev[0].get("sampled_acc_unpruned", ev[0]["sampled_acc"]),
            "reward_drop": max(r[2:]) - r[-1],  # best from the first full 3-step window on
            "peak_grad_norm": max(x["grad_norm"] for x in tr), "kl_k3": mean("kl_k3"),
            "rejected": mean("seq_rejected_frac"), "out_of_set": mean("out_of_set_frac"),
            "minutes": sum(x["time_generate"] + x["time_train"] + x["time_sync"] for x in tr) / 60,
            # runs before 2026-12-03 logged the sum form as bias_bound and had neither the exact form nor kl_k3_all
            **({"bias_bound": mean("bias_bound"), "bias_bound_sum": mean("bias_bound_sum")}
               if "bias_bound_sum" in tr[-1] else {"bias_bound_sum": mean("bias_bound")}),
            **({"kl_k3_all": mean("kl_k3_all")} if "kl_k3_all" in tr[-1] else {}),
            **({k: ev[-1][k] for k in ("bias_measured", "heldout_bias_bound") if k in ev[-1]})}


def finished(recs, steps):
    """Whether a run's records reach `steps` in training and in evaluation."""
    return all((last := train.latest(recs, k)) and last[-1]["step"] >= steps for k in ("train", "eval"))


def seeds_on_disk(runs):
    """The seeds S with at least one run in runs/seedS/ARM/metrics.jsonl."""
    return sorted({int(p.parent.parent.name[len("seed"):]) for p in runs.glob("seed*/*/metrics.jsonl")})


T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}  # Student t, 97.5 %, by d.o.f.


def t_interval(xs):
    """mean and the Student-t 95 % interval of the mean of xs (n >= 2; d.o.f. > 9: 2.262, slightly conservative)."""
    n, m = len(xs), sum(xs) / len(xs)
    sd = (sum((x - m) ** 2 for x in xs) / (n - 1)) ** 0.5
    half = T95.get(n - 1, 2.262) * sd / n ** 0.5
    return m, m - half, m + half


def interval(xs):
    """mean and a 95 % interval over seeds: Student t for n >= 4, min-max for n <= 3."""
    n, m = len(xs), sum(xs) / len(xs)
    return (m, min(xs), max(xs)) if n <= 3 else t_interval(xs)


COLUMNS = [("unpruned_acc", "held-out sampled acc at the end, unpruned sampler", ".3f"),
           ("sampled_acc", "same, own sampler", ".3f"), ("reward_drop", "train reward best-to-end drop", ".3f"),
           ("peak_grad_norm", "peak grad norm", ".2f"), ("kl_k3", "mean K3 KL (in-set tokens)", ".1e"),
           ("kl_k3_all", "mean K3 KL (all tokens, unpruned log pi)", ".1e"),
           ("bias_bound", "mean bias bound (exact)", ".3f"), ("bias_bound_sum", "mean bias bound (sum form)", ".3f"),
           ("bias_measured", "held-out acc at rho minus at 0, end", "+.3f"),
           ("heldout_bias_bound", "its exact bound, end", ".3f"), ("rejected", "sequences rejected", ".3f")]


def compare_table(args, runs):
    """The compare table of the runs in `runs` (mean and interval over seeds per arm): (head, markdown
    lines, {arm: its finished runs' records}). The title takes the regime from the runs' args.json."""
    seeds_done = seeds_on_disk(runs)
    columns = COLUMNS
    if args.preset in PRESETS:   # held-out accuracy at every evaluation, and its largest fall from the best
        evals = range(args.eval_every, args.steps + 1, args.eval_every)
        columns = ([(f"acc@{s}", f"held-out acc step {s}", ".3f") for s in evals]
                   + [("eval_drop", "held-out best-to-end drop", ".3f"), ("greedy_acc", "greedy acc at the end", ".3f")]
                   + COLUMNS[2:])
    lines = ["| arm | seeds | start acc | " + " | ".join(c[1] for c in columns) + " | minutes per run (steps only) |",
             "|---" * (len(columns) + 4) + "|"]
    done = {}
    for arm, (name, *_) in ARMS.items():
        by_seed = {s: read(runs / f"seed{s}" / arm / "metrics.jsonl") for s in seeds_done}
        by_seed = {s: r for s, r in by_seed.items() if finished(r, args.steps)}
        if not by_seed:
            continue
        done[arm] = by_seed
        runs_arm = list(by_seed.values())
        sums = [run_summary(r) for r in runs_arm]
        for x in sums:
            x.update({f"acc@{k}": v for k, v in x["acc_at"].items()})
        cell = lambda k, f: ("{0:{f}} [{1:{f}}, {2:{f}}]".format(*interval([x[k] for x in sums if k in x]), f=f)
                             if any(k in x for x in sums) else "-")
        lines.append(f"| {name} | {len(sums)} | {cell('start_acc', '.3f')} | "
                     + " | ".join(cell(k, f) for k, _, f in columns)
                     + f" | {interval([x['minutes'] for x in sums])[0]:.1f} |")
    head = (f"{regime_of(args, saved_settings(runs))}, SmolLM2-135M-Instruct, arithmetic, {args.steps} steps x 4 "
            f"prompts x 8 samples per run, seeds {sorted(set().union(*done.values()))} (finished runs; the same "
            "prompts for every arm of a seed). "
            "Cells: mean [min, max] over seeds (Student-t 95 % interval from 4 seeds on). "
            "Start acc: held-out sampled accuracy at step 0, unpruned sampler.")
    keys = [("unpruned_acc", "end accuracy")]
    if args.preset in PRESETS:
        keys += [("sampled_acc", "end accuracy, own sampler (min_p = rho)"), ("greedy_acc", "end greedy accuracy"),
                 ("eval_drop", "held-out best-to-end drop")]
    return head, lines + paired_differences(done, keys), done


def paired_differences(done, keys=(("unpruned_acc", "end accuracy"),)):
    """Lines of each arm's value minus that of plain GRPO, of the geo mask and of TIS (each pair once), and
    of a DVP-sequence arm minus token-level DVP at its rho (the out-of-set choice), seed by seed (the same
    prompts), for each (key of run_summary, words) in `keys` (default: the end accuracy, held-out,
    unpruned sampler; the own-sampler key only where one arm prunes), with the paired Student-t 95 %
    interval of the mean from 2 seeds on: the comparison that decides separation (an interval that
    holds 0 detects none)."""
    bases = [b for b in ("plain", "geo", "tis") if b in done]
    pairs = [(arm, base) for i, base in enumerate(bases)
             for arm in done if arm != base and arm not in bases[:i]]         # geo - plain, never plain - geo
    pairs += [(arm, arm[:-3]) for arm in done if arm.endswith("seq") and arm[:-3] in done]
    out = []
    for arm, base in pairs:
        seeds = sorted(set(done[arm]) & set(done[base]))
        for key, words in keys if seeds else ():
            if key == "sampled_acc" and ARMS[arm][1] == ARMS[base][1] == "0":    # min_p = 0: same as unpruned
                continue
            d = [run_summary(done[arm][s])[key] - run_summary(done[base][s])[key] for s in seeds]
            m, lo, hi = t_interval(d) if len(d) > 1 else (d[0], None, None)
            out.append(f"- {ARMS[arm][0]} minus {ARMS[base][0]}, {words}, seeds {seeds}: "
                       + ", ".join(f"{x:+.3f}" for x in d) + f" (mean {m:+.3f}"
                       + (f", paired 95 % t-interval {lo:+.3f} to {hi:+.3f})" if lo is not None else ")"))
    return ["", "Paired differences (same seed, same prompts):"] + out if out else []


def summarize_compare(args):
    """Table (compare_table) and figure (mean line and band per arm) of the runs in
    runs/compare{tag}/, into figures/compare{tag}.md and .png, under compare's note."""
    tag = tag_of(args)
    runs, png, md = (ROOT / "runs" / f"compare{tag}", Path(args.out) / f"compare{tag}.png",
                     Path(args.out) / f"compare{tag}.md")
    note = (runs / "note.md").read_text().strip() if (runs / "note.md").exists() else "re-drawn by `evidence.py plot`"
    head, lines, done = compare_table(args, runs)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    k = 5 if args.preset in PRESETS else 1      # 80 noisy steps: every train-side panel as a trailing 5-step mean
    per = f" ({k}-step mean)" if k > 1 else ""
    panels = [("reward", f"train reward ({max(k, 3)}-step mean)"),
              ("sampled_acc_unpruned", "held-out sampled accuracy\n(solid: unpruned; dashed: own, min_p = rho)"),
              ("grad_norm", "gradient norm" + per),
              ("kl_k3", "K3 KL(mu || pi)" + per + "\n(sampled tokens in the trainer's set: those the loss sees)"),
              ("bias_bound", "bias bound per sequence" + per + "\n(exact; sum form before 2026-12-03)"),
              ("seq_rejected_frac", "sequences rejected (seq-rs, geo, out-of-set)" + per)]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for arm, by_seed in done.items():
        runs_arm, color = list(by_seed.values()), None
        for ax, (key, title) in zip(axes.flat, panels):
            src = "eval" if key.endswith("unpruned") else "train"
            per_seed = [train.latest(r, src) for r in runs_arm]
            steps = sorted(set.intersection(*[{x["step"] for x in recs} for recs in per_seed]))
            # DVP's own sampler (min_p = rho) beside its unpruned one; the other arms sample unpruned
            own = [("sampled_acc", "--")] if src == "eval" and ARMS[arm][1] != "0" else []
            for key_, style in [(key, "-")] + own:
                ys = [[x.get(key_, x.get("sampled_acc", 0.0)) for x in recs if x["step"] in steps]  # plain: sampled
                      for recs in per_seed]
                if src == "train":
                    ys = [smooth(y, max(k, 3) if key == "reward" else k) for y in ys]
                stats = [interval(list(col)) for col in zip(*ys)]
                line, = ax.plot(steps, [m for m, _, _ in stats], style, label=ARMS[arm][0] if style == "-" else None,
                                marker="o" if src == "eval" else None, ms=3, color=color)
                color = line.get_color()
                ax.fill_between(steps, [lo for _, lo, _ in stats], [hi for _, _, hi in stats], alpha=0.15, color=color)
            ax.set_title(title, fontsize=10), ax.set_xlabel("step")
    axes.flat[3].set_yscale("log")
    axes.flat[0].legend(fontsize=8)
    seeds = sorted(set().union(*done.values())) if done else []
    fig.suptitle(f"{regime_of(args, saved_settings(runs))}: mean and band (min-max up to 3 seeds, else 95 % t "
                 f"interval) over seeds {seeds}, finished runs", fontsize=10)
    import textwrap
    fig.text(0.01, 0.005, textwrap.fill(note.replace("`", ""), 230), fontsize=7)
    fig.tight_layout(rect=(0, 0.035, 1, 1))
    fig.savefig(png, dpi=110)
    md.write_text("\n".join([head, ""] + lines + ["", note]) + "\n")
    print("\n".join(lines))
    print(f"wrote {png} and {md}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["mismatch", "compare", "plot", "sweep"])
    p.add_argument("--engine-noise", type=float, default=0.0,
                   help="delta of the engine logit noise (train.py --engine-noise)")
    p.add_argument("--engine-dtype", default="auto",
                   help="vLLM's dtype (train.py --engine-dtype); not bfloat16 goes into the file names")
    p.add_argument("--engine-kv-dtype", default=None,
                   help="vLLM's KV-cache dtype (train.py --engine-kv-dtype), e.g. fp8")
    p.add_argument("--out", default=str(ROOT / "figures"), help="where figures and tables go")
    p.add_argument("--prompts", type=int, default=64, help="mismatch: prompts")
    p.add_argument("--n", type=int, default=4, help="mismatch: samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64, help="mismatch: completion length cap")
    p.add_argument("--rhos", type=float, nargs="+", default=list(RHOS), help="mismatch: the rho values (0 must be one)")
    p.add_argument("--preset", choices=["short", "long", "stress"], default="short",
                   help="compare: short = 15 steps, 5 arms, evaluation at the start and the end; long = " + str(LONG)
                   + "; stress = " + str(STRESS) + " (sweep: always stress)")
    p.add_argument("--deltas", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0],
                   help="sweep: the engine noise deltas, plain GRPO at each")
    p.add_argument("--steps", type=int, default=None, help="compare: steps per run (default: the preset's)")
    p.add_argument("--eval-every", type=int, default=None, help="compare: held-out evaluation every this many steps")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="compare: seeds, every arm runs with each (default 0 1 2); sweep: default 0")
    p.add_argument("--arms", nargs="+", default=None, choices=list(ARMS), help="compare: arms (default: the preset's)")
    args, args.train_args = p.parse_known_args()
    if args.train_args and args.what not in ("compare", "sweep"):
        p.error(f"unrecognized arguments: {' '.join(args.train_args)}")
    if args.what == "sweep":
        args.preset = "stress"
    if args.seeds is None:
        args.seeds = [0] if args.what == "sweep" else [0, 1, 2]
    preset = PRESETS.get(args.preset, dict(steps=15, eval_every=None, arms=DEFAULT_ARMS, engine_kv_dtype="auto"))
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.preset in PRESETS and "--trainer-dtype" not in args.train_args and (DEVICE.type == "cuda" or
                                                                                train.fast_cpu_bf16()):
        args.train_args += ["--trainer-dtype", "bfloat16"]
    if 0.0 not in args.rhos:
        p.error("--rhos must include 0 (the unpruned reference)")
    args.rhos = sorted(args.rhos)             # rho = 0 first: the others' accuracy is measured against it
    Path(args.out).mkdir(exist_ok=True)
    if args.what == "mismatch":
        mismatch(args)
    elif args.what == "compare":
        compare(args)
    elif args.what == "sweep":
        sweep(args)
    else:  # re-draw the compare table and figure from the runs on disk
        summarize_compare(args)


if __name__ == "__main__":
    main()
