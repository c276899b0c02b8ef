"""Tests as a specification of dvp.py (and, at the end, of the training loop in train.py).

Every property is checked against a plain reference computation written out in the test.
Run with `make test`.
"""
import ast
import itertools
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dvp

HERE = Path(__file__).resolve().parent


def rand_logits(*shape, scale=3.0, seed=0, dtype=torch.float64):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def naive_pruned(z, tokens, min_p):
    """Reference: renormalise softmax over {a : p_a >= min_p * p_max}, written in probability space."""
    p = z.double().softmax(-1)
    keep = p >= min_p * p.amax(-1, keepdim=True)
    p_S = torch.where(keep, p, 0.0) / torch.where(keep, p, 0.0).sum(-1, keepdim=True)
    tok = tokens[..., None]
    return p_S.gather(-1, tok).squeeze(-1).log(), keep.gather(-1, tok).squeeze(-1), 1 - torch.where(keep, p, 0.0).sum(-1)


# --- the rule -------------------------------------------------------------------------------

@pytest.mark.parametrize("min_p", [0.0, 1e-4, 1e-2, 0.3, 1.0])
def test_safe_mask_equals_probability_space_definition(min_p):
    z = rand_logits(64, 500)
    p = z.softmax(-1)
    expected = p >= min_p * p.amax(-1, keepdim=True)
    got = dvp.safe_mask(z, min_p)
    assert got.dtype == torch.bool and got.shape == z.shape
    assert torch.equal(got, expected), f"{(got != expected).sum()} positions disagree at min_p={min_p}"


@pytest.mark.parametrize("min_p", [0.0, 0.5, 1.0])
def test_argmax_is_always_kept(min_p):
    z = rand_logits(4, 7, 300, seed=1)
    keep = dvp.safe_mask(z, min_p)
    assert keep.gather(-1, z.argmax(-1, keepdim=True)).all(), "the argmax must always be in the safe set"
    assert (keep.sum(-1) >= 1).all()


def test_min_p_zero_keeps_every_token():
    assert dvp.safe_mask(rand_logits(8, 100, scale=30.0), 0.0).all()


def test_safe_mask_has_no_gradient():
    z = rand_logits(3, 10).requires_grad_()
    assert not dvp.safe_mask(z, 0.1).requires_grad


# --- pruned log-probs -----------------------------------------------------------------------

@pytest.mark.parametrize("min_p", [0.0, 1e-3, 0.05, 0.5])
def test_pruned_logprobs_match_naive_reference(min_p):
    z = rand_logits(2, 30, 200, seed=2)
    tokens = torch.multinomial(z.view(-1, 200).softmax(-1), 1, generator=torch.Generator().manual_seed(0)).view(2, 30)
    out = dvp.pruned_logprobs(z, tokens, min_p)
    ref_logp, ref_in, ref_eps = naive_pruned(z, tokens, min_p)
    assert torch.equal(out.in_set, ref_in)
    torch.testing.assert_close(out.logp[ref_in], ref_logp[ref_in], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.pruned_mass, ref_eps, rtol=1e-8, atol=1e-12)
    assert out.logp.shape == out.in_set.shape == out.pruned_mass.shape == tokens.shape


@pytest.mark.parametrize("min_p", [1e-3, 0.1])
def test_renormalised_probabilities_sum_to_one_over_safe_set(min_p):
    N, V = 6, 40
    z = rand_logits(N, V, seed=3)
    every_token = torch.arange(V).expand(N, V)
    out = dvp.pruned_logprobs(z[:, None, :].expand(N, V, V), every_token, min_p)   # (N, V)
    total = torch.where(out.in_set, out.logp.exp(), 0.0).sum(-1)
    torch.testing.assert_close(total, torch.ones(N, dtype=total.dtype), rtol=0, atol=1e-12)
    assert torch.equal(out.in_set, dvp.safe_mask(z, min_p))


def test_min_p_zero_reproduces_plain_log_softmax():
    z = rand_logits(50, 300, seed=4)
    tokens = torch.randint(0, 300, (50,), generator=torch.Generator().manual_seed(1))
    out = dvp.pruned_logprobs(z, tokens, 0.0)
    torch.testing.assert_close(out.logp, z.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1))
    assert out.in_set.all() and (out.pruned_mass == 0).all()


def test_equals_plain_reinforce_when_min_p_is_zero():
    B, T, V = 6, 9, 80
    z1 = rand_logits(B, T, V, seed=5, dtype=torch.float32).requires_grad_()
    z2 = z1.detach().clone().requires_grad_()
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(3)) > 0.3
    A = dvp.grpo_advantages(torch.rand(B, generator=torch.Generator().manual_seed(4)), group_size=3)
    out = dvp.pruned_logprobs(z1, tokens, 0.0)
    loss = dvp.grpo_loss(out.logp, A, mask & out.in_set)
    plain_logp = z2.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    plain = -(A[:, None] * plain_logp * mask).sum() / mask.sum()           # textbook REINFORCE
    loss.backward(), plain.backward()
    torch.testing.assert_close(loss, plain)
    torch.testing.assert_close(z1.grad, z2.grad)


def test_gradient_is_onehot_minus_pruned_policy():
    z = rand_logits(5, 30, seed=6).requires_grad_()
    tokens = z.argmax(-1)
    dvp.pruned_logprobs(z, tokens, 0.05).logp.sum().backward()
    _, keep, _ = naive_pruned(z.detach(), tokens, 0.05)
    p = z.detach().softmax(-1)
    keep = p >= 0.05 * p.amax(-1, keepdim=True)
    p_S = torch.where(keep, p, 0.0) / torch.where(keep, p, 0.0).sum(-1, keepdim=True)
    torch.testing.assert_close(z.grad, F.one_hot(tokens, 30).double() - p_S)


def test_gradcheck_float64():
    z = rand_logits(7, 23, seed=7).requires_grad_()
    tokens = torch.randint(0, 23, (7,), generator=torch.Generator().manual_seed(5))
    assert torch.autograd.gradcheck(lambda x: dvp.pruned_logprobs(x, tokens, 0.02).logp, (z,))
    h = rand_logits(6, 5, scale=1.0, seed=8).requires_grad_()
    w = rand_logits(23, 5, scale=1.0, seed=9).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: dvp.pruned_logprobs_from_hidden(a, b, tokens[:6], 0.02, chunk_size=4).logp, (h, w))


@pytest.mark.parametrize("rows", [1, 3, 1000])
def test_block_size_does_not_change_values_or_gradients(rows, monkeypatch):
    z = rand_logits(2, 11, 97, seed=10, dtype=torch.float32)
    tokens = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(6))
    def run():
        x = z.clone().requires_grad_()
        out = dvp.pruned_logprobs(x, tokens, 0.01)
        (out.logp * torch.linspace(-1, 1, 22).view(2, 11)).sum().backward()
        return out, x.grad
    ref, ref_grad = run()
    monkeypatch.setattr(dvp, "_block_rows", lambda V, device: rows)
    got, got_grad = run()
    for a, b in zip(ref, got):
        assert torch.equal(a, b), "results must not depend on the block size"
    assert torch.equal(ref_grad, got_grad)


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_hidden_state_variant_equals_full_logits(chunk_size):
    B, T, D, V = 3, 8, 16, 120
    h1 = rand_logits(B, T, D, scale=1.0, seed=11, dtype=torch.float32).requires_grad_()
    w1 = rand_logits(V, D, scale=0.5, seed=12, dtype=torch.float32).requires_grad_()
    h2, w2 = h1.detach().clone().requires_grad_(), w1.detach().clone().requires_grad_()
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(7))
    g = torch.randn(B, T, generator=torch.Generator().manual_seed(8))
    full = dvp.pruned_logprobs(h1 @ w1.T, tokens, 0.01)
    chunked = dvp.pruned_logprobs_from_hidden(h2, w2, tokens, 0.01, chunk_size=chunk_size)
    (full.logp * g).sum().backward(), (chunked.logp * g).sum().backward()
    assert torch.equal(full.in_set, chunked.in_set)
    torch.testing.assert_close(chunked.logp, full.logp)
    torch.testing.assert_close(chunked.pruned_mass, full.pruned_mass)
    torch.testing.assert_close(h2.grad, h1.grad)
    torch.testing.assert_close(w2.grad, w1.grad)


def test_bfloat16_logits_are_computed_in_float32():
    z = rand_logits(20, 64, seed=13, dtype=torch.float32).bfloat16().requires_grad_()
    tokens = torch.randint(0, 64, (20,), generator=torch.Generator().manual_seed(9))
    out = dvp.pruned_logprobs(z, tokens, 0.01)
    assert out.logp.dtype == torch.float32
    ref_logp, ref_in, ref_eps = naive_pruned(z.detach().float(), tokens, 0.01)
    assert torch.equal(out.in_set, ref_in)
    torch.testing.assert_close(out.logp[ref_in].double(), ref_logp[ref_in], rtol=1e-5, atol=1e-5)
    out.logp.sum().backward()
    assert z.grad.dtype == torch.bfloat16 and torch.isfinite(z.grad).all()


def test_out_of_set_tokens_never_produce_inf_or_nan():
    z = rand_logits(4, 10, 50, seed=14).requires_grad_()
    tokens = z.argmin(-1)                                   # surely outside the safe set at 0.1
    out = dvp.pruned_logprobs(z, tokens, 0.1)
    assert not out.in_set.any()
    assert torch.isfinite(out.logp).all(), "logp must stay finite where the token is not in the set"
    assert (out.logp < math.log(0.1)).all(), "out-of-set logp = z_a - lse_S lies below log(min_p)"
    A = torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    mask = torch.ones(4, 10, dtype=torch.bool)
    loss = dvp.grpo_loss(out.logp, A, mask & out.in_set, old_logp=out.logp.detach() - 5.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(z.grad).all() and (z.grad == 0).all()
    # even -inf log-probs (another trainer's convention) must not leak through the mask
    bad = torch.full((4, 10), -math.inf, dtype=torch.float64, requires_grad=True)
    loss = dvp.grpo_loss(bad, A, torch.zeros(4, 10, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(bad.grad).all()


def test_nan_weights_at_masked_positions_do_not_reach_the_gradient():
    logp = torch.full((2, 3), -math.inf)
    logp[:, 0] = torch.tensor([-1.0, -2.0])
    logp.requires_grad_()
    mask = torch.tensor([[True, False, False], [True, False, False]])
    engine = torch.full((2, 3), -math.inf)                    # padding: -inf on both sides -> NaN ratio
    engine[:, 0] = -1.5
    w = dvp.tis_weights(logp, engine)
    assert w[:, 1:].isnan().all(), "the premise: TIS weights are NaN at the padding"
    loss = dvp.grpo_loss(logp, torch.tensor([1.0, -1.0]), mask, weights=w)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert (logp.grad[:, 1:] == 0).all()


def test_all_masked_batch_gives_zero_loss_not_nan():
    logp = torch.randn(3, 5, requires_grad=True)
    loss = dvp.grpo_loss(logp, torch.ones(3), torch.zeros(3, 5, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and (logp.grad == 0).all()


def test_empty_batch_gives_empty_results():
    z, h, w = torch.randn(0, 7, requires_grad=True), torch.randn(0, 3, requires_grad=True), torch.randn(7, 3, requires_grad=True)
    tok = torch.zeros(0, dtype=torch.long)
    for res in (dvp.pruned_logprobs(z, tok, 0.1), dvp.pruned_logprobs_from_hidden(h, w, tok, 0.1)):
        assert all(x.shape == (0,) for x in res)
        res.logp.sum().backward()
    assert z.grad.shape == z.shape and h.grad.shape == h.shape and (w.grad == 0).all()


# --- the per-token mismatch bound and the sequence-level bias bound --------------------------

@pytest.mark.parametrize("delta", [0.01, 0.1, 1.0])
def test_mismatch_bound_holds_for_every_token(delta):
    z = rand_logits(200, 1000, seed=15)
    e = delta * (2 * torch.rand(z.shape, generator=torch.Generator().manual_seed(10), dtype=torch.float64) - 1)
    log_pi, log_mu = z.log_softmax(-1), (z + e).log_softmax(-1)
    gap = (log_mu - log_pi).abs()
    bound = 2 * delta * (1 - torch.minimum(log_pi, log_mu).exp())
    assert (gap <= bound + 1e-12).all(), f"max gap/bound = {(gap / bound).max():.4f} > 1"
    assert (gap / bound).max() > 0.5, "the bound should not be vacuous on this example"


def _enumerate(V, T, seed, scale):
    """A tiny autoregressive model: one random logit vector per prefix. Returns every sequence
    (V**T, T) and the logits at each of its steps (V**T, T, V)."""
    g = torch.Generator().manual_seed(seed)
    table = {}
    seqs = torch.tensor(list(itertools.product(range(V), repeat=T)))
    logits = torch.empty(len(seqs), T, V, dtype=torch.float64)
    for i, y in enumerate(seqs.tolist()):
        for t in range(T):
            prefix = tuple(y[:t])
            if prefix not in table:
                table[prefix] = scale * torch.randn(V, generator=g, dtype=torch.float64)
            logits[i, t] = table[prefix]
    return seqs, logits


@pytest.mark.parametrize("seed,min_p", [(0, 0.05), (1, 0.2), (2, 0.01), (3, 0.5)])
def test_bias_bound_holds_exactly_on_an_enumerated_model(seed, min_p):
    V, T = 4, 4
    seqs, z = _enumerate(V, T, seed, scale=2.5)
    R_min, R_max = -1.0, 2.0
    R = R_min + (R_max - R_min) * torch.rand(len(seqs), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    mask = torch.ones(len(seqs), T, dtype=torch.bool)
    plain = dvp.pruned_logprobs(z, seqs, 0.0)
    pruned = dvp.pruned_logprobs(z, seqs, min_p)
    P = plain.logp.sum(-1).exp()                                            # P_pi(y), exact
    P_S = torch.where(pruned.in_set, pruned.logp, -math.inf).sum(-1).exp()  # P_{pi_S}(y), exact
    torch.testing.assert_close(P.sum(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(P_S.sum(), torch.tensor(1.0, dtype=torch.float64))
    J, J_S = (P * R).sum(), (P_S * R).sum()
    per_seq = dvp.bias_bound(pruned.pruned_mass, mask, reward_range=R_max - R_min)
    bound = (P_S * per_seq).sum()                                           # E_{y ~ pi_S}[...]
    tv = 0.5 * (P - P_S).abs().sum()
    assert (J_S - J).abs() <= bound + 1e-12, f"|J_S - J| = {(J_S - J).abs():.4g} > bound {bound:.4g}"
    assert tv <= bound / (R_max - R_min) + 1e-12, f"TV {tv:.4g} exceeds E[sum_t eps]"
    assert bound < R_max - R_min, "the bound must say more than the trivial |J_S - J| <= R_max - R_min"
    worst = dvp.worst_case_bias_bound(pruned.pruned_mass, mask, reward_range=R_max - R_min)
    assert bound <= worst + 1e-12


def test_bias_bound_is_reward_range_times_masked_sum():
    eps = torch.tensor([[0.1, 0.2, 0.3], [0.0, 0.5, 9.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    torch.testing.assert_close(dvp.bias_bound(eps, mask, reward_range=2.0), torch.tensor([0.6, 1.0]))
    assert dvp.worst_case_bias_bound(eps, mask, reward_range=2.0) == pytest.approx(2.0 * 2 * 0.5)


# --- GRPO pieces and the baseline corrections -------------------------------------------------

def test_grpo_advantages_match_reference():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    A = dvp.grpo_advantages(r, group_size=4)
    for g in range(2):
        grp = r[4 * g:4 * g + 4]
        torch.testing.assert_close(A[4 * g:4 * g + 4], (grp - grp.mean()) / (grp.std() + 1e-6))
    assert (A[4:] == 0).all(), "a group with equal rewards carries no signal"


def test_clipped_loss_has_the_reinforce_gradient_on_policy():
    logp1 = torch.randn(4, 6, requires_grad=True)
    logp2 = logp1.detach().clone().requires_grad_()
    A, mask = torch.randn(4), torch.rand(4, 6, generator=torch.Generator().manual_seed(0)) > 0.2
    dvp.grpo_loss(logp1, A, mask).backward()
    dvp.grpo_loss(logp2, A, mask, old_logp=logp2.detach()).backward()
    torch.testing.assert_close(logp1.grad, logp2.grad)


def test_clipped_loss_stops_the_gradient_outside_the_trust_region():
    logp = torch.zeros(1, 2, requires_grad=True)
    old = torch.tensor([[-1.0, -0.1]])                       # ratios e^1 (clipped) and e^0.1 (not)
    dvp.grpo_loss(logp, torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool), old_logp=old).backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] != 0


def test_num_tokens_makes_micro_batches_add_up_to_the_full_batch():
    logp, A = torch.randn(6, 5), torch.randn(6)
    mask = torch.rand(6, 5, generator=torch.Generator().manual_seed(1)) > 0.4
    full = dvp.grpo_loss(logp, A, mask)
    parts = sum(dvp.grpo_loss(logp[i:i + 2], A[i:i + 2], mask[i:i + 2], num_tokens=mask.sum()) for i in range(0, 6, 2))
    torch.testing.assert_close(parts, full)


def test_tis_weights_and_mis_mask_match_reference():
    logp = torch.log(torch.tensor([[0.5, 0.2, 0.9], [0.1, 0.1, 0.1]]))
    mu = torch.log(torch.tensor([[0.1, 0.4, 0.9], [0.1, 0.1, 0.9]]))
    torch.testing.assert_close(dvp.tis_weights(logp, mu, cap=2.0), torch.tensor([[2.0, 0.5, 1.0], [1.0, 1.0, 1 / 9]]))
    mask = torch.ones(2, 3, dtype=torch.bool)
    # sequence ratios: 5 * 0.5 * 1 = 2.5 (kept at C=3), 1/9 (dropped)
    assert dvp.mis_mask(logp, mu, mask, cap=3.0).tolist() == [True, False]
    mask[1, 2] = False                                                  # masked tokens do not count
    assert dvp.mis_mask(logp, mu, mask, cap=3.0).tolist() == [True, True]


def test_geo_mask_matches_reference():
    logp = torch.log(torch.tensor([[0.5, 0.2, 0.9], [0.1, 0.1, 0.1], [0.3, 0.3, 0.3]]))
    mu = torch.log(torch.tensor([[0.5, 0.2, 0.9], [0.1, 0.2, 0.1], [0.3, 0.3, 0.3]]))
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    # per-sequence geometric mean of pi/mu: 1, (1 * 0.5 * 1)^(1/3) = 0.794, empty sequence (kept)
    assert dvp.geo_mask(logp, mu, mask).tolist() == [True, False, True]
    assert dvp.geo_mask(logp, mu, mask, lo=0.79, hi=1.01).tolist() == [True, True, True]
    assert dvp.geo_mask(logp, mu, mask, lo=0.8, hi=1.01).tolist() == [True, False, True]
    mask[1, 1] = False                                                  # masked tokens do not count
    assert dvp.geo_mask(logp, mu, mask).tolist() == [True, True, True]


# --- masks as TRL (integer) and verl (float) pass them ------------------------------------------

def _mask_calls():
    g = torch.Generator().manual_seed(5)
    logp = torch.log(torch.rand(4, 6, generator=g, dtype=torch.float64).clamp_min(1e-3)).requires_grad_()
    mu = logp.detach() + 0.3 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    A, eps = torch.randn(4, generator=g, dtype=torch.float64), 0.01 * torch.rand(4, 6, generator=g, dtype=torch.float64)
    return {
        "grpo_loss": lambda m: dvp.grpo_loss(logp, A, m),
        "grpo_loss clipped": lambda m: dvp.grpo_loss(logp, A, m, old_logp=mu),
        "mis_mask": lambda m: dvp.mis_mask(logp, mu, m, cap=1.5),
        "geo_mask": lambda m: dvp.geo_mask(logp, mu, m, lo=0.9, hi=1.1),
        "bias_bound": lambda m: dvp.bias_bound(eps, m),
        "worst_case_bias_bound": lambda m: torch.tensor(dvp.worst_case_bias_bound(eps, m)),
        "mismatch_stats": lambda m: torch.tensor([v for v in dvp.mismatch_stats(logp, mu, m, m, eps).values() if not math.isnan(v)]),
    }


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", list(_mask_calls()))
def test_integer_and_float_masks_give_exactly_the_bool_result(name, dtype):
    call = _mask_calls()[name]
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(2)) > 0.3
    assert torch.equal(call(mask.to(dtype)), call(mask)), f"{name} with a {dtype} mask differs from the bool mask"


@pytest.mark.parametrize("bad", [2, 0.5, math.nan, -1])
@pytest.mark.parametrize("name", list(_mask_calls()))
def test_masks_with_other_values_are_rejected_naming_the_argument(name, bad):
    mask = torch.ones(4, 6)
    mask[1, 2] = bad
    with pytest.raises(ValueError, match="mask must be"):
        _mask_calls()[name](mask)


# --- mask replay: the sampler's kept set instead of the trainer's own ----------------------------

def naive_replay(z, tokens, keep):
    """Reference: renormalise softmax over an arbitrary kept set, in probability space."""
    p = z.double().softmax(-1)
    p_S = torch.where(keep, p, 0.0) / torch.where(keep, p, 0.0).sum(-1, keepdim=True)
    tok = tokens[..., None]
    return p_S.gather(-1, tok).squeeze(-1).log(), keep.gather(-1, tok).squeeze(-1), 1 - torch.where(keep, p, 0.0).sum(-1)


def random_keep(N, V, seed):
    """A kept set per position as a sampler might return it: a random subset, never empty."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(N, V, generator=g) < 0.3
    keep[torch.arange(N), torch.randint(V, (N,), generator=g)] = True
    return keep


def to_csr(keep):
    """bool (N, V) -> vLLM's (token_ids, offsets)."""
    ids = [torch.nonzero(row).flatten() for row in keep]
    return torch.cat(ids), torch.tensor([0] + [len(x) for x in ids]).cumsum(0)


@pytest.mark.parametrize("form", ["bool", "int", "csr"])
def test_mask_replay_matches_naive_reference_with_gradients(form):
    N, V = 12, 40
    z = rand_logits(N, V, seed=3).requires_grad_()
    keep = random_keep(N, V, seed=4)
    tokens = torch.where(torch.arange(N) % 3 == 0, torch.randint(V, (N,), generator=torch.Generator().manual_seed(5)),
                         torch.multinomial(keep.double(), 1, generator=torch.Generator().manual_seed(6)).squeeze(-1))
    given = {"bool": keep, "int": keep.long(), "csr": to_csr(keep)}[form]
    out = dvp.pruned_logprobs(z, tokens, 0.5, keep=given)              # min_p is ignored when keep is given
    ref_logp, ref_in, ref_eps = naive_replay(z.detach(), tokens, keep)
    assert torch.equal(out.in_set, ref_in)
    assert (~ref_in).any() and ref_in.any(), "the test should cover tokens inside and outside the kept set"
    torch.testing.assert_close(out.logp[ref_in], ref_logp[ref_in])
    torch.testing.assert_close(out.pruned_mass, ref_eps)
    w = torch.randn(N, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    (g,) = torch.autograd.grad((torch.where(out.in_set, out.logp, 0.0) * w).sum(), z)
    zz = z.detach().clone().requires_grad_()
    ref = torch.where(keep, zz, -math.inf).log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
    (g_ref,) = torch.autograd.grad((torch.where(ref_in, ref, 0.0) * w).sum(), zz)
    torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("form", ["bool", "csr"])
def test_mask_replay_from_hidden_equals_full_logits_in_any_chunk(form):
    N, D, V = 10, 8, 30
    g = torch.Generator().manual_seed(8)
    h = torch.randn(N, D, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(V, D, generator=g, dtype=torch.float64).requires_grad_()
    keep = random_keep(N, V, seed=9)
    tokens = torch.randint(V, (N,), generator=g)
    given = keep if form == "bool" else to_csr(keep)
    ref = dvp.pruned_logprobs(h @ w.T, tokens, 0.0, keep=keep)
    ref_grads = torch.autograd.grad(ref.logp.sum(), (h, w))
    for chunk in (1, 3, 100):
        out = dvp.pruned_logprobs_from_hidden(h, w, tokens, 0.0, chunk_size=chunk, keep=given)
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b)
        for a, b in zip(torch.autograd.grad(out.logp.sum(), (h, w)), ref_grads):
            torch.testing.assert_close(a, b)


def test_replaying_the_min_p_set_equals_the_min_p_rule():
    z = rand_logits(3, 7, 50, seed=10)
    tokens = torch.randint(50, (3, 7), generator=torch.Generator().manual_seed(11))
    own = dvp.pruned_logprobs(z, tokens, 0.05)
    replay = dvp.pruned_logprobs(z, tokens, 0.0, keep=dvp.safe_mask(z, 0.05))   # keep shaped (..., V)
    for a, b in zip(own, replay):
        torch.testing.assert_close(a, b)


def test_bad_kept_sets_are_rejected():
    z, tokens = rand_logits(4, 10, seed=12), torch.zeros(4, dtype=torch.long)
    keep = torch.ones(4, 10, dtype=torch.bool)
    ids, offsets = to_csr(keep)
    cases = [(keep[:, :9], "shaped like the logits"), (keep.clone().index_fill_(0, torch.tensor([2]), False), "keeps no token"),
             (keep * 2, "keep must be"), ((ids, offsets[:-1]), "offsets"), ((ids.float(), offsets), "integer"),
             ((ids + 10, offsets), r"\[0, 10\)"), ((ids, offsets.flip(0)), "offsets must start at 0"), (keep.tolist(), "CSR pair")]
    for bad, msg in cases:
        with pytest.raises(ValueError, match=msg):
            dvp.pruned_logprobs(z, tokens, 0.0, keep=bad)


def test_mismatch_stats_match_reference():
    g = torch.Generator().manual_seed(11)
    logp = torch.log(torch.rand(5, 40, generator=g, dtype=torch.float64).clamp_min(1e-5))
    mu = logp + 0.05 * torch.randn(5, 40, generator=g, dtype=torch.float64)
    mask = torch.rand(5, 40, generator=g) > 0.2
    in_set = torch.rand(5, 40, generator=g) > 0.1
    eps = 0.01 * torch.rand(5, 40, generator=g, dtype=torch.float64)
    s = dvp.mismatch_stats(logp, mu, mask, in_set, eps, reward_range=2.0)
    ok = mask & in_set
    r = (logp - mu)[ok]
    assert s["mismatch_mean"] == pytest.approx(r.abs().mean().item())
    assert s["mismatch_max"] == pytest.approx(r.abs().max().item())
    assert s["kl_k3"] == pytest.approx((r.exp() - 1 - r).mean().item())
    assert s["chi2"] == pytest.approx(((2 * r).exp().mean() - 1).item())
    assert s["out_of_set_frac"] == pytest.approx((mask & ~in_set).sum().item() / mask.sum().item())
    assert s["bias_bound"] == pytest.approx((2.0 * (eps * mask).sum(-1)).mean().item())
    assert sum(s[k] for k in s if k.startswith("count_")) == ok.sum().item()
    p = logp[ok].exp()
    b = (p >= 0.1) & (p < 0.5)
    assert s["gap_0.1_0.5"] == pytest.approx(r[b].abs().mean().item())


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("min_p", [-0.1, 1.5, float("nan"), "0.1"])
def test_min_p_outside_unit_interval_is_rejected(min_p):
    with pytest.raises(ValueError, match="min_p"):
        dvp.safe_mask(torch.zeros(2, 3), min_p)
    with pytest.raises(ValueError, match="min_p"):
        dvp.pruned_logprobs(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), min_p)


def test_bad_shapes_and_token_ids_are_rejected():
    z = torch.zeros(4, 10)
    with pytest.raises(ValueError, match="shape"):
        dvp.pruned_logprobs(z, torch.zeros(5, dtype=torch.long), 0.1)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        dvp.pruned_logprobs(z, torch.tensor([0, 1, 2, 10]), 0.1)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        dvp.pruned_logprobs(z, torch.tensor([0, -1, 2, 3]), 0.1)
    with pytest.raises(ValueError, match="integer"):
        dvp.pruned_logprobs(z, torch.zeros(4), 0.1)
    with pytest.raises(ValueError, match="disagree"):
        dvp.pruned_logprobs_from_hidden(torch.zeros(4, 3), torch.zeros(10, 5), torch.zeros(4, dtype=torch.long), 0.1)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        dvp.pruned_logprobs_from_hidden(torch.zeros(4, 5), torch.zeros(10, 5), torch.tensor([0, 1, 2, 11]), 0.1)
    with pytest.raises(ValueError, match="group_size"):
        dvp.grpo_advantages(torch.zeros(4), group_size=1)
    with pytest.raises(ValueError, match="multiple"):
        dvp.grpo_advantages(torch.zeros(5), group_size=2)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_logits_are_rejected(bad):
    z = torch.zeros(4, 10)
    z[2, 3] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        dvp.pruned_logprobs(z, torch.zeros(4, dtype=torch.long), 0.1)
    w = torch.zeros(10, 5)
    w[3, 0] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        dvp.pruned_logprobs_from_hidden(torch.ones(4, 5), w, torch.zeros(4, dtype=torch.long), 0.1)


# --- the file itself ------------------------------------------------------------------------------

def test_dvp_imports_only_torch_and_the_standard_library():
    tree = ast.parse((HERE / "dvp.py").read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    extra = {n for n in names if n != "torch" and n not in sys.stdlib_module_names}
    assert not extra, f"dvp.py must work when copied alone; it imports {extra}"


def test_dvp_demo_runs_and_its_bound_holds():
    out = subprocess.run([sys.executable, "dvp.py"], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    ratio = float(out.stdout.split("(2 delta (1 - min(pi, mu))) =")[1].split()[0])
    assert 0.3 < ratio <= 1.0, out.stdout
    assert "min_p" in out.stdout and "mean |S|" in out.stdout


# --- the training loop: real vLLM engine, a tiny random model with SmolLM2's tokenizer -------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import train
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(train.resolve_model(train.Args()))  # the embedded model's tokenizer
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,  # head_dim 64, as SmolLM2
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      initializer_range=0.2)  # peaked next-token distributions, so min_p prunes something
    path = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_shared_prompt_forward_equals_full_sequences(tiny_model):
    import train
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    prompts = [[1, 5, 9, 33], [7, 8]]
    completions = [[11, 12, 13], [14], [15, 16, 17, 18, 19], [20, 21]]           # G = 2 per prompt
    h = train.completion_hidden(model, prompts, completions, group_size=2)
    for i, c in enumerate(completions):
        p = prompts[i // 2]
        full = model.model(input_ids=torch.tensor([p + c])).last_hidden_state[0]  # (len(p)+len(c), D)
        torch.testing.assert_close(h[i, :len(c)], full[len(p) - 1:len(p) - 1 + len(c)], rtol=1e-4, atol=1e-5)


def test_trainer_logprobs_match_full_sequences_in_any_micro_batch(tiny_model):
    import train
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    prompts = [[1, 5, 9, 33], [7, 8]]
    completions = [[11, 12, 13], [14], [15, 16, 17, 18, 19], [20, 21]]           # G = 2 per prompt
    min_p, temp = 0.05, 0.7
    full, set_size = train.trainer_logprobs(model, prompts, completions, 2, min_p, temp)  # (4, 5)
    assert full.logp.shape == (4, 5) and 1 <= set_size <= len(model.get_output_embeddings().weight)
    pruned_any = False
    for i, c in enumerate(completions):
        p = prompts[i // 2]
        with torch.no_grad():
            z = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:len(p) - 1 + len(c)] / temp  # (len(c), V)
        ref_logp, ref_in, ref_eps = naive_pruned(z, torch.tensor(c), min_p)
        assert torch.equal(full.in_set[i, :len(c)], ref_in), f"completion {i}: safe-set membership differs"
        torch.testing.assert_close(full.logp[i, :len(c)][ref_in].double(), ref_logp[ref_in], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(full.pruned_mass[i, :len(c)].double(), ref_eps, rtol=1e-3, atol=1e-5)
        assert (full.logp[i, len(c):] == 0).all() and not full.in_set[i, len(c):].any()
        pruned_any |= bool((ref_eps > 0).any())
    assert pruned_any, "min_p should prune something on this model"
    # a micro-batch holding one group, shorter than the batch, padded to the batch's width
    for g in range(2):
        part, _ = train.trainer_logprobs(model, prompts[g:g + 1], completions[2 * g:2 * g + 2], 2, min_p, temp, width=5)
        for a, b in zip(part, full):
            torch.testing.assert_close(a, b[2 * g:2 * g + 2], rtol=1e-5, atol=1e-5)


def test_reward_is_the_last_number_and_failures_name_the_sample(monkeypatch):
    import train
    assert train.reward_fn("3 + 4 = 7", 7) == 1.0
    assert train.reward_fn("It is 7, not 8", 7) == 0.0
    assert train.reward_fn("about 1,234.5 apples", 1234.5) == 1.0
    assert train.reward_fn("no number", 0) == 0.0
    monkeypatch.setattr(train, "reward_fn", lambda c, a: 1 / 0 if c == "bad" else 1.0)
    with pytest.raises(RuntimeError, match="sample 1"):
        train.score(["ok", "bad"], [1, 2])


def test_engine_dtype_is_bfloat16_on_a_gpu_and_explicit_values_win():
    import train
    assert train.engine_dtype(train.Args(), torch.device("cuda")) == "bfloat16"
    assert train.engine_dtype(train.Args(), torch.device("cpu")) in ("bfloat16", "float32")
    assert train.engine_dtype(train.Args(engine_dtype="float32"), torch.device("cuda")) == "float32"


@pytest.mark.parametrize("argv,msg", [(["--min-p", "1.5"], "--min-p"), (["--group-size", "1"], "--group-size"),
                                      (["--correction", "foo"], "--correction"), (["--engine-dtype", "fp8"], "--engine-dtype"),
                                      (["--trainer-dtype", "float16"], "--trainer-dtype")])
def test_bad_command_line_is_rejected(argv, msg, capsys):
    import train
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert msg in capsys.readouterr().err


def test_missing_vllm_and_model_give_clear_errors(monkeypatch, tmp_path):
    import train
    monkeypatch.setitem(sys.modules, "vllm", None)                  # import vllm now raises ImportError
    with pytest.raises(SystemExit, match="pip install"):
        train.start_engine("x", train.Args(), torch.device("cpu"), max_model_len=64, seed=0)
    with pytest.raises(SystemExit, match="no such folder"):
        train.resolve_model(train.Args(model=str(tmp_path / "nope")))
    with pytest.raises(SystemExit, match="config.json"):
        train.resolve_model(train.Args(model=str(tmp_path)))


def test_unknown_kv_cache_dtype_names_what_vllm_accepts():
    import train
    with pytest.raises(SystemExit, match="vLLM accepts.*fp8"):
        train.start_engine("x", train.Args(engine_kv_dtype="fp9"), torch.device("cpu"), max_model_len=64, seed=0)


def test_bf16_trainer_is_close_to_fp32_and_steps_float32_master_weights(tiny_model):
    import train
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    prompts, completions = [[1, 5, 9, 33], [7, 8]], [[11, 12, 13], [14], [15, 16, 17, 18, 19], [20, 21]]
    ref, _ = train.trainer_logprobs(model, prompts, completions, 2, 0.0)
    fast = train.compute_copy(model, torch.bfloat16)
    assert train.compute_copy(model, torch.float32) is model
    assert all(p.dtype == torch.float32 for p in model.parameters()), "the master weights stay float32"
    out, _ = train.trainer_logprobs(fast, prompts, completions, 2, 0.0)
    assert out.logp.dtype == torch.float32, "dvp.py's softmax stays float32 under the bf16 trainer"
    real = ref.in_set
    # bf16 keeps 8 bits of mantissa: about 1 % of these large (|log p| ~ 15) log-probs
    torch.testing.assert_close(out.logp[real], ref.logp[real], rtol=0.03, atol=0.03)
    # two micro-batches: the master gradient is the float32 sum of the bf16 copy's gradients
    out.logp.sum().backward()
    g1 = [q.grad.float() for q in fast.parameters()]
    train.add_grads(model, fast)
    assert all(q.grad is None for q in fast.parameters())
    out, _ = train.trainer_logprobs(fast, prompts, completions, 2, 0.0)
    (2 * out.logp.sum()).backward()
    g2 = [q.grad.float() for q in fast.parameters()]
    train.add_grads(model, fast)
    for p, a, b in zip(model.parameters(), g1, g2):
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
        torch.testing.assert_close(p.grad, a + b, rtol=1e-6, atol=1e-8)
    # an optimizer step on the master weights reaches the copy, rounded to bf16
    torch.optim.SGD(model.parameters(), lr=1e-2).step()
    train.refresh(model, fast)
    for p, q in zip(model.parameters(), fast.parameters()):
        assert q.dtype == torch.bfloat16 and torch.equal(q, p.detach().bfloat16())


def read_jsonl(path):
    import json
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def run_train(*argv):
    return subprocess.run([sys.executable, "train.py", *argv], cwd=HERE, capture_output=True, text=True, timeout=600)


def test_train_runs_end_to_end_and_resumes_without_losing_records(tiny_model, tmp_path):
    out = tmp_path / "run"
    common = ["--model", str(tiny_model), "--out", str(out), "--group-size", "2", "--prompts-per-step", "2",
              "--max-new-tokens", "8", "--eval-size", "4", "--micro-batch", "2", "--eval-every", "1", "--checkpoint-every", "1", "--min-p", "0.01"]
    r = run_train("--steps", "2", *common)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = read_jsonl(out / "metrics.jsonl")
    train_recs = [x for x in recs if x["kind"] == "train"]
    assert [x["step"] for x in train_recs] == [1, 2]
    assert [x["step"] for x in recs if x["kind"] == "eval"] == [0, 1, 2]
    needed = {"reward", "accuracy", "completion_len", "loss", "grad_norm", "mismatch_mean", "mismatch_max", "kl_k3",
              "chi2", "out_of_set_frac", "pruned_mass_mean", "safe_set_size", "bias_bound", "gap_0_0.001", "gap_0.9_1",
              "time_generate", "time_train", "time_sync"}
    for x in train_recs:
        assert needed <= x.keys(), f"missing {needed - x.keys()}"
        assert all(math.isfinite(x[k]) for k in needed if not k.startswith("gap_")), x
        assert x["completion_len"] > 0 and x["mismatch_mean"] > 0 and 0 < x["pruned_mass_mean"] < 1
    assert (out / "checkpoint.pt").exists()

    r = run_train("--steps", "2", *common)                     # the same folder without --resume: refused
    assert r.returncode != 0 and "--resume" in r.stderr

    r = run_train("--steps", "2", "--resume", *common)        # already complete: nothing to do, nothing written
    assert r.returncode == 0 and "nothing to do" in r.stdout and read_jsonl(out / "metrics.jsonl") == recs

    r = run_train("--steps", "3", "--resume", *common, "--lr", "1e-3")     # other settings: refused, nothing written
    assert r.returncode != 0 and "lr" in r.stderr and read_jsonl(out / "metrics.jsonl") == recs

    r = run_train("--steps", "3", "--resume", *common)
    assert r.returncode == 0, r.stderr[-3000:]
    after = read_jsonl(out / "metrics.jsonl")
    assert after[:len(recs)] == recs, "resume must keep every earlier record"
    assert after[len(recs)] == {"kind": "resume", "from_step": 2, "time": after[len(recs)]["time"]}
    assert [x["step"] for x in after if x["kind"] == "train"] == [1, 2, 3]


def test_fp8_kv_cache_run_with_the_geo_mask_is_recorded_and_quiet(tiny_model, tmp_path):
    import json
    out = tmp_path / "fp8"
    r = run_train("--model", str(tiny_model), "--out", str(out), "--group-size", "2", "--prompts-per-step", "4",
                  "--max-new-tokens", "8", "--eval-size", "4", "--steps", "1", "--min-p", "0", "--correction", "geo",
                  "--engine-kv-dtype", "fp8")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "args.json").read_text())["engine_kv_dtype"] == "fp8"
    rec = [x for x in read_jsonl(out / "metrics.jsonl") if x["kind"] == "train"][0]
    assert 0.0 <= rec["seq_rejected_frac"] <= 1.0 and rec["mismatch_mean"] > 0
    assert " INFO " not in r.stdout + r.stderr, "vLLM's INFO logging should be off by default"
    assert "Done: 1 steps" in r.stdout and "--resume" in r.stdout, "the run ends with a summary and how to resume"


def test_engine_noise_amplifies_the_measured_mismatch(tiny_model, tmp_path):
    common = ["--model", str(tiny_model), "--group-size", "2", "--prompts-per-step", "4", "--max-new-tokens", "8",
              "--eval-size", "2", "--steps", "1", "--min-p", "0"]
    gaps = {}
    for delta in ("0", "0.5"):
        r = run_train(*common, "--out", str(tmp_path / delta), "--engine-noise", delta)
        assert r.returncode == 0, r.stderr[-3000:]
        gaps[delta] = [x for x in read_jsonl(tmp_path / delta / "metrics.jsonl") if x["kind"] == "train"][0]["mismatch_mean"]
    # uniform noise in [-delta, delta] on every logit moves tail log-probs by about delta / 2 (0.25 here) on top of
    # the natural bf16-vs-fp32 gap, which is about 0.05 for this random tiny model
    assert gaps["0.5"] > gaps["0"] + 0.1, gaps


def test_weight_sync_changes_what_the_engine_returns(tiny_model):
    import train
    from transformers import AutoModelForCausalLM
    llm = train.start_engine(str(tiny_model), train.Args(), torch.device("cpu"), max_model_len=128, seed=0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    prompts = ["What is 2 + 2?", "Hello"]
    greedy = lambda: [r[1] for r in train.generate(llm, prompts, n=1, temperature=0, min_p=0.0, max_tokens=8)]
    train.sync_weights(llm, model)                             # engine == trainer (bf16-rounded), checked
    before = greedy()
    with torch.no_grad():                                      # only linear layers, which the CPU engine repacks
        for name, p in model.named_parameters():
            if name.endswith(("mlp.down_proj.weight", "self_attn.o_proj.weight")):
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    train.sync_weights(llm, model)
    assert greedy() != before, "the engine's output did not change after syncing new linear weights"
    with torch.no_grad():
        model.model.norm.weight.mul_(2.0)                      # trainer moves on, engine not told
    with pytest.raises(RuntimeError, match="did not apply"):
        train.check_sync(llm, model)


# --- DVP inside TRL's GRPOTrainer (examples.py) --------------------------------------------------

def make_trl_trainer(tiny_model, tmp_path, min_p, **overrides):
    import datasets                                                     # both pinned in requirements.txt: a missing one fails
    from examples import DVPGRPOTrainer, GRPOConfig
    ds = datasets.Dataset.from_dict({"prompt": [f"What is {a} + {a}?" for a in range(8)], "answer": [2 * a for a in range(8)]})
    reward = lambda completions, **_: [float(sum(map(ord, c)) % 2) for c in completions]   # arbitrary but varied
    kw = dict(output_dir=str(tmp_path / "trl"), min_p=min_p, num_generations=2, per_device_train_batch_size=4,
              max_completion_length=8, learning_rate=1e-3, max_steps=2, logging_steps=1, report_to="none", use_cpu=True,
              bf16=False, use_vllm=False, save_strategy="no", seed=0)
    return DVPGRPOTrainer(model=str(tiny_model), reward_funcs=reward, args=GRPOConfig(**{**kw, **overrides}), train_dataset=ds)


def test_trl_dvp_logprobs_equal_trls_own_when_min_p_is_zero(tiny_model, tmp_path):
    from trl import GRPOTrainer
    trainer = make_trl_trainer(tiny_model, tmp_path, min_p=0.0, temperature=0.7)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 1000, (3, 12), generator=g)
    am = torch.ones_like(ids)
    am[0, :3] = 0                                                       # a left-padded prompt
    am[1, -2:] = 0                                                      # a completion that ended early
    model = trainer.model
    ours, ent, _ = trainer._get_per_token_logps_and_entropies(model, ids, am, 5, compute_entropy=True)
    theirs, ent_trl, _ = GRPOTrainer._get_per_token_logps_and_entropies(trainer, model, ids, am, 5, compute_entropy=True)
    real = am[:, -5:].bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ent[real], ent_trl[real], rtol=1e-3, atol=1e-3)


def test_trl_dvp_masks_and_counts_out_of_set_tokens(tiny_model, tmp_path):
    trainer = make_trl_trainer(tiny_model, tmp_path, min_p=0.05)
    model = trainer.model
    ids = torch.randint(100, 1000, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():                                               # completion: 3 greedy tokens, then the least likely
        for _ in range(3):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], 1)
        ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmin(-1)], 1)
        z = model(input_ids=ids).logits[:, -5:-1]                       # (2, 4): the states that predict the completion
    in_set = dvp.safe_mask(z, 0.05).gather(-1, ids[:, -4:, None]).squeeze(-1)
    assert in_set[:, :3].all() and not in_set[:, 3].any()
    model.train()                                                       # metrics go to "train"
    logp, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, torch.ones_like(ids), 4)
    head = model.get_output_embeddings().weight
    (g_out,) = torch.autograd.grad(logp[:, 3].sum(), head, retain_graph=True, allow_unused=True)
    (g_in,) = torch.autograd.grad(logp[:, :3].sum(), head)
    assert g_out is None or not g_out.any(), "an out-of-set token must not send a gradient"
    assert g_in.abs().sum() > 0 and torch.isfinite(logp).all()
    assert trainer._metrics["train"]["dvp/out_of_set_frac"][-1] == pytest.approx(2 / 8), "2 of 8 tokens are out of the set"


def test_trl_grpo_trainer_trains_two_steps_with_dvp(tiny_model, tmp_path):
    trainer = make_trl_trainer(tiny_model, tmp_path, min_p=0.05)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [x for x in trainer.state.log_history if "loss" in x]
    assert len(logs) == 2, trainer.state.log_history
    for x in logs:
        assert math.isfinite(float(x["loss"])) and 0 < float(x["dvp/pruned_mass"]) < 1, x
        assert float(x["dvp/out_of_set_frac"]) == 0.0, "generate and the trainer share numerics here: nothing falls outside"
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters()), "no parameter changed"


# --- the compare table's arithmetic (scripts/evidence.py) ----------------------------------------

def test_compare_summary_reads_seeds_and_computes_the_table_cells(tmp_path):
    import json
    sys.path.insert(0, str(HERE / "scripts"))
    import evidence
    rewards = [0.1, 0.2, 0.6, 0.9, 0.3, 0.3]                  # 3-step means from step 3: 0.3, 0.567, 0.6, 0.5
    for seed, arm in [(0, "plain"), (1, "plain"), (12, "dvp")]:
        d = tmp_path / f"seed{seed}" / arm
        d.mkdir(parents=True)
        recs = [{"kind": "eval", "step": 0, "sampled_acc": 0.1, "greedy_acc": 0.2}]
        recs += [{"kind": "train", "step": i + 1, "reward": r, "grad_norm": 1.0 + i, "kl_k3": 0.01, "bias_bound": 0.0,
                  "seq_rejected_frac": 0.0, "out_of_set_frac": 0.0, "time_generate": 1.0, "time_train": 2.0, "time_sync": 0.0}
                 for i, r in enumerate(rewards)]
        recs += [{"kind": "eval", "step": 6, "sampled_acc": 0.5 + seed / 100, "greedy_acc": 0.6, "sampled_acc_unpruned": 0.4}]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert evidence.seeds_on_disk(tmp_path) == [0, 1, 12]
    s = evidence.run_summary(evidence.read(tmp_path / "seed1" / "plain" / "metrics.jsonl"))
    assert s["reward_drop"] == pytest.approx(0.6 - 0.5) and s["peak_grad_norm"] == 6.0
    assert s["sampled_acc"] == 0.51 and s["unpruned_acc"] == 0.4 and s["minutes"] == pytest.approx(18 / 60)
    assert evidence.interval([1.0, 3.0, 2.0]) == (2.0, 1.0, 3.0)                  # n <= 3: mean, min, max
    m, lo, hi = evidence.interval([1.0, 2.0, 3.0, 4.0])                          # n = 4: Student t, 3 d.o.f.
    assert m == 2.5 and hi - m == pytest.approx(3.182 * (5 / 3) ** 0.5 / 2, rel=1e-3) and lo == pytest.approx(2 * m - hi)
