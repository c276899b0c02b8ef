"""The specification of dvp.py: every property is checked against a plain reference computation
written out in the test, and the fast path against dvp.py's own plain definition.

Needs only torch and pytest: copy dvp.py and this file into any folder and run `pytest test_dvp.py`.
`make test` runs it with the tests of the training loop (test_train.py).
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
    return (p_S.gather(-1, tok).squeeze(-1).log(), keep.gather(-1, tok).squeeze(-1),
            1 - torch.where(keep, p, 0.0).sum(-1))


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

BOTH = pytest.mark.parametrize("fn", [dvp.pruned_logprobs_plain, dvp.pruned_logprobs], ids=["plain", "fast"])


@BOTH
@pytest.mark.parametrize("min_p", [0.0, 1e-3, 0.05, 0.5])
def test_pruned_logprobs_match_naive_reference(min_p, fn):
    z = rand_logits(2, 30, 200, seed=2)
    tokens = torch.multinomial(z.view(-1, 200).softmax(-1), 1, generator=torch.Generator().manual_seed(0)).view(2, 30)
    out = fn(z, tokens, min_p)
    ref_logp, ref_in, ref_eps = naive_pruned(z, tokens, min_p)
    assert torch.equal(out.in_set, ref_in)
    torch.testing.assert_close(out.logp[ref_in], ref_logp[ref_in], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.pruned_mass, ref_eps, rtol=1e-8, atol=1e-12)
    assert out.logp.shape == out.in_set.shape == out.pruned_mass.shape == tokens.shape


@BOTH
@pytest.mark.parametrize("min_p", [1e-3, 0.1])
def test_renormalised_probabilities_sum_to_one_over_safe_set(min_p, fn):
    N, V = 6, 40
    z = rand_logits(N, V, seed=3)
    every_token = torch.arange(V).expand(N, V)
    out = fn(z[:, None, :].expand(N, V, V), every_token, min_p)   # (N, V)
    total = torch.where(out.in_set, out.logp.exp(), 0.0).sum(-1)
    torch.testing.assert_close(total, torch.ones(N, dtype=total.dtype), rtol=0, atol=1e-12)
    assert torch.equal(out.in_set, dvp.safe_mask(z, min_p))


@BOTH
def test_min_p_zero_reproduces_plain_log_softmax(fn):
    z = rand_logits(50, 300, seed=4)
    tokens = torch.randint(0, 300, (50,), generator=torch.Generator().manual_seed(1))
    out = fn(z, tokens, 0.0)
    torch.testing.assert_close(out.logp, z.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1))
    assert out.in_set.all() and (out.pruned_mass == 0).all()


@BOTH
def test_equals_plain_reinforce_when_min_p_is_zero(fn):
    B, T, V = 6, 9, 80
    z1 = rand_logits(B, T, V, seed=5, dtype=torch.float32).requires_grad_()
    z2 = z1.detach().clone().requires_grad_()
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(3)) > 0.3
    A = dvp.grpo_advantages(torch.rand(B, generator=torch.Generator().manual_seed(4)), group_size=3)
    out = fn(z1, tokens, 0.0)
    loss = dvp.grpo_loss(out.logp, A, mask & out.in_set)
    plain_logp = z2.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    plain = -(A[:, None] * plain_logp * mask).sum() / mask.sum()           # textbook REINFORCE
    loss.backward(), plain.backward()
    torch.testing.assert_close(loss, plain)
    torch.testing.assert_close(z1.grad, z2.grad)


@BOTH
def test_gradient_is_onehot_minus_pruned_policy(fn):
    z = rand_logits(5, 30, seed=6).requires_grad_()
    tokens = z.argmax(-1)
    fn(z, tokens, 0.05).logp.sum().backward()
    p = z.detach().softmax(-1)
    keep = p >= 0.05 * p.amax(-1, keepdim=True)
    p_S = torch.where(keep, p, 0.0) / torch.where(keep, p, 0.0).sum(-1, keepdim=True)
    torch.testing.assert_close(z.grad, F.one_hot(tokens, 30).double() - p_S)


def test_gradcheck_float64():
    z = rand_logits(7, 23, seed=7).requires_grad_()
    tokens = torch.randint(0, 23, (7,), generator=torch.Generator().manual_seed(5))
    assert torch.autograd.gradcheck(lambda x: dvp.pruned_logprobs(x, tokens, 0.02).logp, (z,))
    assert torch.autograd.gradcheck(lambda x: dvp.pruned_logprobs_plain(x, tokens, 0.02).logp, (z,))
    h = rand_logits(6, 5, scale=1.0, seed=8).requires_grad_()
    w = rand_logits(23, 5, scale=1.0, seed=9).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: dvp.pruned_logprobs_from_hidden(a, b, tokens[:6], 0.02, chunk_size=4).logp, (h, w))


# --- the fast path equals the plain definition ---------------------------------------------------

# the CPU always; a GPU too where torch sees one (scripts/gpu_check.py runs this file there)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6),
       torch.bfloat16: dict(rtol=1e-5, atol=1e-6)}      # bf16 inputs are computed in float32 by both


def _replay(form, keep):
    return None if form is None else {"bool": keep, "csr": to_csr(keep.reshape(-1, keep.shape[-1]))}[form]


@pytest.mark.parametrize("replay", [None, "bool", "csr"])
@pytest.mark.parametrize("min_p", [0.0, 1e-3, 0.05, 0.5, 1.0])      # 1.0: only the argmax (e = 1 >= 1) is kept
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_fast_path_equals_the_plain_definition(device, dtype, min_p, replay, monkeypatch):
    """pruned_logprobs == pruned_logprobs_plain: logp, in_set, pruned_mass and the gradient, in row
    blocks smaller than the batch (the block size is forced to 5 rows)."""
    monkeypatch.setattr(dvp, "_block_rows", lambda V, device: 5)
    B, T, V = 3, 8, 300
    z = rand_logits(B, T, V, seed=30, dtype=torch.float32).to(device, dtype)
    probs = z.cpu().double().view(-1, V).softmax(-1)
    sampled = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(31))
    uniform = torch.randint(V, (B * T,), generator=torch.Generator().manual_seed(36))   # mostly outside the set
    tokens = torch.where(torch.arange(B * T) % 2 == 0, sampled.squeeze(-1), uniform).view(B, T).to(device)
    keep = random_keep(B * T, V, seed=32).view(B, T, V).to(device)
    g = torch.randn(B, T, generator=torch.Generator().manual_seed(33), dtype=torch.float64).to(device)
    results = []
    for fn, given in ((dvp.pruned_logprobs_plain, None if replay is None else keep), (dvp.pruned_logprobs,
                                                                                      _replay(replay, keep))):
        x = z.clone().requires_grad_()
        out = fn(x, tokens, min_p, keep=given)
        (out.logp * g.to(out.logp.dtype)).sum().backward()
        results.append((out, x.grad))
    (plain, plain_grad), (fast, fast_grad) = results
    assert torch.equal(fast.in_set, plain.in_set), "the fast path keeps another set"
    if replay is None and 0 < min_p < 0.5:
        assert (~plain.in_set).any() and (plain.pruned_mass > 0).any(), "the test should prune something"
    assert fast.logp.dtype == plain.logp.dtype and fast_grad.dtype == plain_grad.dtype == dtype
    torch.testing.assert_close(fast.logp, plain.logp, **TOL[dtype])
    torch.testing.assert_close(fast.pruned_mass, plain.pruned_mass, **TOL[dtype])
    torch.testing.assert_close(fast_grad, plain_grad, **({} if dtype == torch.bfloat16 else TOL[dtype]))


@pytest.mark.parametrize("replay", [None, "csr"])
@pytest.mark.parametrize("min_p", [0.0, 0.05])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_hidden_state_path_equals_the_plain_definition(device, dtype, min_p, replay):
    """pruned_logprobs_from_hidden(h, w) == pruned_logprobs_plain(h @ w.T), with gradients for h
    and w (one chunk: the same matmul on both sides; test_hidden_state_variant_equals_full_logits
    covers smaller chunks)."""
    N, D, V = 20, 16, 120
    gen = torch.Generator().manual_seed(34)
    h0 = torch.randn(N, D, generator=gen).to(device, dtype)
    w0 = (0.5 * torch.randn(V, D, generator=gen)).to(device, dtype)
    tokens = torch.randint(V, (N,), generator=gen).to(device)
    keep = random_keep(N, V, seed=35).to(device)
    g = torch.randn(N, generator=gen, dtype=torch.float64).to(device)
    h1, w1, h2, w2 = (x.clone().requires_grad_() for x in (h0, w0, h0, w0))
    plain = dvp.pruned_logprobs_plain(h1 @ w1.T, tokens, min_p, keep=None if replay is None else keep)
    fast = dvp.pruned_logprobs_from_hidden(h2, w2, tokens, min_p, chunk_size=N, keep=_replay(replay, keep))
    (plain.logp * g.to(plain.logp.dtype)).sum().backward(), (fast.logp * g.to(fast.logp.dtype)).sum().backward()
    assert torch.equal(fast.in_set, plain.in_set)
    torch.testing.assert_close(fast.logp, plain.logp, **TOL[dtype])
    torch.testing.assert_close(fast.pruned_mass, plain.pruned_mass, **TOL[dtype])
    for a, b in ((h2.grad, h1.grad), (w2.grad, w1.grad)):
        assert a.dtype == b.dtype == dtype
        torch.testing.assert_close(a, b, **({} if dtype == torch.bfloat16 else TOL[dtype]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_fast_path_equals_plain_at_the_devices_own_block_size(device, dtype):
    """Three row blocks of _block_rows(V, device) rows (the last one partial), as a real vocabulary
    gives them: about 20 rows on a CPU, about 1300 on a GPU."""
    V = 50_000
    N = 2 * dvp._block_rows(V, torch.device(device)) + 3
    gen = torch.Generator(device=device).manual_seed(37)
    z = (3 * torch.randn(N, V, generator=gen, device=device)).to(dtype)
    tokens = torch.randint(V, (N,), generator=gen, device=device)
    tokens[::2] = z[::2].float().argmax(-1)                          # half of them surely in the set
    outs, grads = [], []
    for fn in (dvp.pruned_logprobs_plain, dvp.pruned_logprobs):
        x = z.clone().requires_grad_()
        out = fn(x, tokens, 0.01)
        out.logp.sum().backward()
        outs.append(out)
        grads.append(x.grad)
    (plain, fast), tol = outs, dict(rtol=1e-5, atol=1e-5)
    assert torch.equal(fast.in_set, plain.in_set) and plain.in_set.any() and not plain.in_set.all()
    torch.testing.assert_close(fast.logp, plain.logp, **tol)
    torch.testing.assert_close(fast.pruned_mass, plain.pruned_mass, **tol)
    torch.testing.assert_close(grads[1], grads[0], **({} if dtype == torch.bfloat16 else tol))


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


@BOTH
def test_bfloat16_logits_are_computed_in_float32(fn):
    z = rand_logits(20, 64, seed=13, dtype=torch.float32).bfloat16().requires_grad_()
    tokens = torch.randint(0, 64, (20,), generator=torch.Generator().manual_seed(9))
    out = fn(z, tokens, 0.01)
    assert out.logp.dtype == torch.float32
    ref_logp, ref_in, ref_eps = naive_pruned(z.detach().float(), tokens, 0.01)
    assert torch.equal(out.in_set, ref_in)
    torch.testing.assert_close(out.logp[ref_in].double(), ref_logp[ref_in], rtol=1e-5, atol=1e-5)
    out.logp.sum().backward()
    assert z.grad.dtype == torch.bfloat16 and torch.isfinite(z.grad).all()


@BOTH
def test_out_of_set_tokens_never_produce_inf_or_nan(fn):
    z = rand_logits(4, 10, 50, seed=14).requires_grad_()
    tokens = z.argmin(-1)                                   # surely outside the safe set at 0.1
    out = fn(z, tokens, 0.1)
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
    z, h, w = (torch.randn(0, 7, requires_grad=True), torch.randn(0, 3, requires_grad=True),
               torch.randn(7, 3, requires_grad=True))
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


def test_worst_case_bias_bound_is_longest_masked_length_times_largest_masked_eps():
    """Sequences of unequal length (B = 3, 6 columns): T is the largest number of mask tokens in one
    sequence (5, not the padded width 6), eps the largest pruned mass at a mask token (0.06);
    values outside the mask count for neither."""
    eps = torch.tensor([[0.01, 0.02, 0.90, 0.90, 0.90, 0.90],       # 2 tokens; large eps in the padding
                        [0.03, 0.01, 0.02, 0.04, 0.01, 0.90],       # 5 tokens: the longest
                        [0.06, 0.00, 0.02, 0.80, 0.00, 0.90]], dtype=torch.float64)   # 3 tokens (a hole at 1)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1, 0, 1, 0, 1, 0]], dtype=torch.bool)
    got = dvp.worst_case_bias_bound(eps, mask, reward_range=2.0)
    assert got == pytest.approx(2.0 * 5 * 0.06), f"expected R * T * max eps = 2 * 5 * 0.06, got {got}"
    assert dvp.worst_case_bias_bound(eps, mask) == pytest.approx(5 * 0.06), "reward_range defaults to 1"
    assert dvp.worst_case_bias_bound(eps, torch.zeros_like(mask)) == 0.0, "an empty mask bounds nothing away"


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
def test_exact_bias_bound_is_the_sequence_tv_and_bounds_every_reward(seed, min_p):
    V, T = 4, 4
    seqs, z = _enumerate(V, T, seed, scale=2.5)
    R_min, R_max = -1.0, 2.0
    mask = torch.ones(len(seqs), T, dtype=torch.bool)
    plain = dvp.pruned_logprobs(z, seqs, 0.0)
    pruned = dvp.pruned_logprobs(z, seqs, min_p)
    P = plain.logp.sum(-1).exp()                                            # P_pi(y), exact
    P_S = torch.where(pruned.in_set, pruned.logp, -math.inf).sum(-1).exp()  # P_{pi_S}(y), exact
    torch.testing.assert_close(P.sum(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(P_S.sum(), torch.tensor(1.0, dtype=torch.float64))
    tv = 0.5 * (P - P_S).abs().sum()
    per_seq = dvp.bias_bound(pruned.pruned_mass, mask, reward_range=R_max - R_min)
    bound = (P_S * per_seq).sum()                                           # E_{y ~ pi_S}[...]
    torch.testing.assert_close(bound, (R_max - R_min) * tv, msg="E_{pi_S}[1 - prod Z] must equal TV exactly")
    g = torch.Generator().manual_seed(seed)
    worst_R = torch.where(P_S > P, R_max, R_min)                            # the reward that attains the TV
    for R in [R_min + (R_max - R_min) * torch.rand(len(seqs), generator=g, dtype=torch.float64) for _ in range(20)]:
        gap = ((P_S - P) * R).sum().abs()
        assert gap <= bound + 1e-12, f"|J_S - J| = {gap:.4g} > exact bound {bound:.4g}"
    torch.testing.assert_close(((P_S - P) * worst_R).sum(), bound, msg="the bound is attained by some reward")
    assert bool((per_seq <= R_max - R_min).all()) and bool((per_seq >= 0).all())
    sum_form = (P_S * dvp.bias_bound_sum(pruned.pruned_mass, mask, reward_range=R_max - R_min)).sum()
    worst = dvp.worst_case_bias_bound(pruned.pruned_mass, mask, reward_range=R_max - R_min)
    assert bound < sum_form <= worst + 1e-12, \
        f"expected exact {bound:.4g} < sum {sum_form:.4g} <= T max eps {worst:.4g}"


def test_bias_bound_forms_on_hand_values_and_masks():
    eps = torch.tensor([[0.1, 0.2, 0.3], [0.0, 0.5, 0.9], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, False], [True, False, False]])
    torch.testing.assert_close(dvp.bias_bound(eps, mask, reward_range=2.0),
                               torch.tensor([2 * (1 - 0.9 * 0.8), 2 * (1 - 1.0 * 0.5), 0.0]))
    torch.testing.assert_close(dvp.bias_bound_sum(eps, mask, reward_range=2.0), torch.tensor([0.6, 1.0, 0.0]))
    assert dvp.worst_case_bias_bound(eps, mask, reward_range=2.0) == pytest.approx(2.0 * 2 * 0.5)


def test_exact_bound_stays_below_the_reward_range_where_the_sum_form_exceeds_it():
    eps = torch.full((3, 40), 0.05)
    mask = torch.ones(3, 40, dtype=torch.bool)
    mask[2, 10:] = False
    exact, total = dvp.bias_bound(eps, mask), dvp.bias_bound_sum(eps, mask)
    torch.testing.assert_close(exact, torch.tensor([1 - 0.95 ** 40, 1 - 0.95 ** 40, 1 - 0.95 ** 10]))
    assert total[0] == pytest.approx(2.0) and exact[0] < 1.0, "sum form 2 > R_max - R_min = 1; exact form below 1"


def test_exact_bound_is_accurate_for_tiny_pruned_mass_in_float32():
    eps = torch.full((1, 10), 1e-9, dtype=torch.float32)        # 1 - eps rounds to 1 in float32
    b = dvp.bias_bound(eps, torch.ones(1, 10, dtype=torch.bool))
    assert b.item() == pytest.approx(1e-8, rel=1e-4), f"expected ~1e-8 (log space), got {b.item():.3g}"


def test_sequence_in_set_requires_every_real_token_in_the_set():
    in_set = torch.tensor([[True, True, False], [True, False, True], [True, True, True], [False, False, False]])
    mask = torch.tensor([[True, True, False], [True, True, True], [True, True, True], [False, False, False]])
    assert dvp.sequence_in_set(in_set, mask).tolist() == [True, False, True, True], \
        "padding does not count; one real out-of-set token rejects the sequence"


# --- GRPO pieces and the baseline corrections -------------------------------------------------

def test_grpo_advantages_match_reference():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    A = dvp.grpo_advantages(r, group_size=4)
    for g in range(2):
        grp = r[4 * g:4 * g + 4]
        torch.testing.assert_close(A[4 * g:4 * g + 4], (grp - grp.mean()) / (grp.std() + 1e-6))
    assert (A[4:] == 0).all(), "a group with equal rewards carries no signal"


def reference_advantages(rewards, G, eps):
    """(R - group mean) / (unbiased group std + eps), in plain Python floats."""
    out = []
    for g in range(0, len(rewards), G):
        grp = [float(x) for x in rewards[g:g + G]]
        m = sum(grp) / G
        s = math.sqrt(sum((x - m) ** 2 for x in grp) / (G - 1))
        out += [(x - m) / (s + eps) for x in grp]
    return torch.tensor(out)


@pytest.mark.parametrize("G", [2, 3, 4])
def test_grpo_advantages_use_each_groups_own_mean_and_unbiased_std_plus_eps(G):
    """Groups with different means and spreads (a batch-wide mean or std, a biased std, eps added
    elsewhere than to the std, groups taken across the batch instead of contiguous: all differ)."""
    r = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.2, 0.9, 0.4, 3.0, 5.0, 2.0, 2.0, 7.0])
    for eps in (1e-6, 0.5):
        torch.testing.assert_close(dvp.grpo_advantages(r, G, eps=eps), reference_advantages(r, G, eps),
                                   rtol=1e-6, atol=1e-7, msg=f"G={G}, eps={eps}")
    small = torch.tensor([0.0, 2 ** -10, 0.0, 2 ** -9, 1.0, 1.0 + 2 ** -10])   # spreads ~1e-3, exact in float32
    torch.testing.assert_close(dvp.grpo_advantages(small, 2), reference_advantages(small, 2, 1e-6),
                               rtol=1e-5, atol=0, msg="the default eps is 1e-6")


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


def test_clipped_loss_takes_the_pessimistic_side_for_negative_advantages():
    logp = torch.zeros(1, 3, requires_grad=True)
    old = torch.tensor([[1.0, -1.0, -0.1]])                  # ratios e^-1 (below 1 - eps), e^1 (above), e^0.1
    loss = dvp.grpo_loss(logp, torch.tensor([-1.0]), torch.ones(1, 3, dtype=torch.bool), old_logp=old)
    r = torch.exp(-old[0])
    expected = -(torch.minimum(-r, -r.clamp(0.8, 1.2))).sum() / 3   # min(r A, clip(r) A) with A = -1
    torch.testing.assert_close(loss, expected)
    loss.backward()
    # A < 0: the ratio below 1 - eps is clipped (no gradient), the one above 1 + eps is not
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] != 0 and logp.grad[0, 2] != 0


@pytest.mark.parametrize("clip_eps", [None, 0.1, 0.3])                    # None: the default, 0.2
def test_clipped_loss_is_ppos_pessimistic_objective_on_both_sides_for_both_signs(clip_eps):
    """Ratios below 1 - eps, inside and above 1 + eps, with A > 0 and A < 0: the values are
    min(r A, clip(r) A) token by token, and the gradient is that of r A where the ratio is
    unclipped on the side that matters (A > 0: r < 1 + eps; A < 0: r > 1 - eps), 0 elsewhere."""
    eps = 0.2 if clip_eps is None else clip_eps
    r = torch.tensor([0.5, 0.75, 0.85, 0.95, 1.0, 1.05, 1.15, 1.25, 1.5], dtype=torch.float64)   # no r at 1 +- eps
    old = torch.randn(2, 9, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    logp = (old + r.log()).requires_grad_()
    A = torch.tensor([1.5, -0.7], dtype=torch.float64)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 3] = False
    kw = {} if clip_eps is None else {"clip_eps": clip_eps}
    loss = dvp.grpo_loss(logp, A, mask, old_logp=old, **kw)
    upper, lower = torch.minimum(r, torch.tensor(1 + eps)), torch.maximum(r, torch.tensor(1 - eps))
    f = torch.stack([A[0] * upper, A[1] * lower])                           # the pessimistic side of each sign
    n = mask.sum()
    torch.testing.assert_close(loss, -(f * mask).sum() / n, msg="loss value")
    (grad,) = torch.autograd.grad(loss, logp)
    active = torch.stack([r < 1 + eps, r > 1 - eps]) & mask               # where the ratio still moves f
    expected = torch.where(active, -A[:, None] * r / n, 0.0)               # d(-r A / n)/d logp = -r A / n
    torch.testing.assert_close(grad, expected, msg="gradient: r A / n where unclipped, 0 where clipped")
    assert (~active[0] & mask[0]).any() and (~active[1] & mask[1]).any(), "the test should clip on both sides"


@pytest.mark.parametrize("shape", ["token", "sequence"])
def test_weights_multiply_each_token_and_get_no_gradient(shape):
    g = torch.Generator().manual_seed(3)
    logp = torch.randn(3, 4, generator=g, requires_grad=True)
    A, mask = torch.randn(3, generator=g), torch.rand(3, 4, generator=g) > 0.3
    w = torch.rand(3, 4, generator=g) if shape == "token" else torch.rand(3, generator=g)
    w.requires_grad_()
    loss = dvp.grpo_loss(logp, A, mask, weights=w)
    w_full = w if shape == "token" else w[:, None].expand(3, 4)
    expected = -(mask * w_full * A[:, None] * logp).sum() / mask.sum()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert w.grad is None, "importance weights are constants of the loss (detached)"


def test_num_tokens_makes_micro_batches_add_up_to_the_full_batch():
    logp, A = torch.randn(6, 5), torch.randn(6)
    mask = torch.rand(6, 5, generator=torch.Generator().manual_seed(1)) > 0.4
    full = dvp.grpo_loss(logp, A, mask)
    parts = sum(dvp.grpo_loss(logp[i:i + 2], A[i:i + 2], mask[i:i + 2], num_tokens=mask.sum()) for i in range(0, 6, 2))
    torch.testing.assert_close(parts, full)


def test_tis_weights_and_seq_reject_mask_match_reference():
    logp = torch.log(torch.tensor([[0.5, 0.2, 0.9], [0.1, 0.1, 0.1]]))
    mu = torch.log(torch.tensor([[0.1, 0.4, 0.9], [0.1, 0.1, 0.9]]))
    torch.testing.assert_close(dvp.tis_weights(logp, mu, cap=2.0), torch.tensor([[2.0, 0.5, 1.0], [1.0, 1.0, 1 / 9]]))
    mask = torch.ones(2, 3, dtype=torch.bool)
    # sequence ratios: 5 * 0.5 * 1 = 2.5 (kept at C=3), 1/9 (dropped)
    assert dvp.seq_reject_mask(logp, mu, mask, cap=3.0).tolist() == [True, False]
    mask[1, 2] = False                                                  # masked tokens do not count
    assert dvp.seq_reject_mask(logp, mu, mask, cap=3.0).tolist() == [True, True]


@pytest.mark.parametrize("cap", [None, 1.5, 4.0])                         # None: the default, 2
def test_tis_weights_are_pi_over_mu_capped_from_above_only_and_detached(cap):
    """w = min(pi / mu, cap): ratios far below 1 stay as they are (no floor), ratios above the cap
    become the cap, the direction is pi / mu (not mu / pi), and w carries no gradient."""
    pi = torch.tensor([[0.5, 0.2, 0.9, 0.03], [0.1, 0.8, 0.3, 0.6]], dtype=torch.float64)
    mu = torch.tensor([[0.1, 0.4, 0.9, 0.3], [0.1, 0.2, 0.1, 0.2]], dtype=torch.float64)   # ratios 5 .5 1 .1 / 1 4 3 3
    logp = pi.log().requires_grad_()
    w = dvp.tis_weights(logp, mu.log(), **({} if cap is None else {"cap": cap}))
    expected = (pi / mu).clamp(max=2.0 if cap is None else cap)
    torch.testing.assert_close(w, expected, msg=f"cap={cap}")
    assert not w.requires_grad and w.grad_fn is None, "TIS weights are constants of the loss (detached)"


def test_seq_reject_keeps_a_sequence_whose_ratio_is_exactly_at_either_bound():
    logp = torch.tensor([[math.log(3.0), 0.0], [-math.log(3.0), 0.0], [math.log(3.0) + 1e-9, 0.0]],
                        dtype=torch.float64)
    mu, mask = torch.zeros(3, 2, dtype=torch.float64), torch.ones(3, 2, dtype=torch.bool)
    got = dvp.seq_reject_mask(logp, mu, mask, cap=3.0).tolist()
    assert got == [True, True, False], f"ratio in [1/C, C], ends included; got {got}"


def verl_seq_sum_k1(logp, engine_logp, mask, cap):
    """verl 0.9.1's rollout rejection with rollout_rs="seq_sum_k1" and rollout_rs_threshold=cap
    (compute_rollout_rejection_mask in verl/trainer/ppo/rollout_corr_helper.py), written out: token_k1 =
    -clamp(old_log_prob - rollout_log_prob, -20, 20), summed over the response mask; a single threshold
    C gives the bounds [1/C, C] (_parse_rollout_rs_thresholds), compared in log space, ends included."""
    token_k1 = -torch.clamp(logp - engine_logp, min=-20.0, max=20.0)
    stat = (token_k1 * mask).sum(-1)
    return (stat >= math.log(1.0 / cap)) & (stat <= math.log(cap))


def test_seq_reject_mask_is_verls_seq_sum_k1():
    g = torch.Generator().manual_seed(13)
    logp = torch.log(torch.rand(400, 30, generator=g, dtype=torch.float64).clamp_min(1e-4))
    mu = logp + 0.02 + 0.15 * torch.randn(400, 30, generator=g, dtype=torch.float64)  # an engine biased upwards
    mu[0] = logp[0]
    mu[0, :2] += torch.tensor([60.0, -40.0], dtype=torch.float64)     # sum 20, clamped to +20 - 20 = 0: kept, as verl
    mask = torch.rand(400, 30, generator=g) > 0.3
    mask[0, :2] = True
    mask[1] = False                                                                     # an empty sequence: kept
    for cap in (3.0, 2.0, 1.5):
        got, ref = dvp.seq_reject_mask(logp, mu, mask, cap), verl_seq_sum_k1(logp, mu, mask.double(), cap)
        assert torch.equal(got, ref), f"{(got != ref).sum()} sequences differ from verl at cap {cap}"
        assert got.any() and not got.all(), "the test should keep some sequences and drop others"
    assert bool(got[0]) and bool(got[1]), "a clamped token pair and an empty sequence are kept, as in verl"
    stat = -torch.clamp(logp - mu, -20.0, 20.0).mul(mask).sum(-1)
    assert ((stat < -math.log(3.0)) & ~dvp.seq_reject_mask(logp, mu, mask)).any(), \
        "sequences the engine under-weights (ratio pi/mu above 3) are dropped too: the filter is two-sided"


def verl_seq_mean_k1(logp, engine_logp, mask, lo, hi):
    """verl 0.9.1's rollout rejection with rollout_rs="seq_mean_k1" (compute_rollout_rejection_mask in
    verl/trainer/ppo/rollout_corr_helper.py), written out: log_ratio = old_log_prob - rollout_log_prob,
    token_k1 = -clamp(log_ratio, -20, 20), masked_mean divides by (mask.sum + 1e-8)."""
    token_k1 = -torch.clamp(logp - engine_logp, min=-20.0, max=20.0)
    stat = (token_k1 * mask).sum(-1) / (mask.sum(-1) + 1e-8)
    return (stat >= math.log(lo)) & (stat <= math.log(hi))


def test_geo_mask_is_verls_seq_mean_k1():
    g = torch.Generator().manual_seed(12)
    logp = torch.log(torch.rand(400, 30, generator=g, dtype=torch.float64).clamp_min(1e-4))
    mu = logp + 0.08 + 0.3 * torch.randn(400, 30, generator=g, dtype=torch.float64)   # an engine biased upwards
    mu[0, 0] = logp[0, 0] + 60.0                                                        # clamped at 20, as verl
    mask = torch.rand(400, 30, generator=g) > 0.3
    mask[1] = False                                                                     # an empty sequence
    for lo, hi in ((0.9, 1.1), (0.999, 1.001), (0.95, 1.2)):
        got, ref = dvp.geo_mask(logp, mu, mask, lo, hi), verl_seq_mean_k1(logp, mu, mask.double(), lo, hi)
        assert torch.equal(got, ref), f"{(got != ref).sum()} sequences differ from verl at [{lo}, {hi}]"
        assert got.any() and not got.all(), "the test should keep some sequences and drop others"
    stat = -torch.clamp(logp - mu, -20.0, 20.0).mul(mask).sum(-1) / (mask.sum(-1) + 1e-8)   # verl's statistic
    torch.testing.assert_close(dvp.geo_statistic(logp, mu, mask), stat, rtol=1e-12, atol=1e-12)


def test_geo_mask_statistic_is_log_mu_minus_log_pi_with_inclusive_ends():
    logp = torch.log(torch.tensor([[0.5, 0.5], [0.3, 0.3]]))
    mu = logp + torch.tensor([[0.2, 0.2], [0.0, 0.0]])     # seq 0: the engine over-weights, exp(mean) = e^0.2 = 1.22
    mask = torch.ones(2, 2, dtype=torch.bool)
    assert dvp.geo_mask(logp, mu, mask, lo=1.2, hi=1.3).tolist() == [True, False]
    assert dvp.geo_mask(logp, mu, mask, lo=0.8, hi=1.1).tolist() == [False, True], "pi/mu = 0.82 must not count"
    assert dvp.geo_mask(logp, mu, mask, lo=1.0, hi=1.1)[1], "statistic 0 at lo = 1: kept (>=)"
    assert dvp.geo_mask(logp, mu, mask, lo=0.9, hi=1.0)[1], "statistic 0 at hi = 1: kept (<=)"
    assert not dvp.geo_mask(logp, mu, mask, lo=1.0001, hi=1.1)[1] and not dvp.geo_mask(logp, mu, mask, 0.9, 0.9999)[1]
    mask[0, 1] = False                                      # masked tokens do not count
    mu[0, 1] = logp[0, 1] + 5.0
    assert dvp.geo_mask(logp, mu, mask, lo=1.2, hi=1.3)[0]


# --- masks as TRL (integer) and verl (float) pass them ------------------------------------------

def _mask_calls():
    g = torch.Generator().manual_seed(5)
    logp = torch.log(torch.rand(4, 6, generator=g, dtype=torch.float64).clamp_min(1e-3)).requires_grad_()
    mu = logp.detach() + 0.3 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    A, eps = torch.randn(4, generator=g, dtype=torch.float64), 0.01 * torch.rand(4, 6, generator=g, dtype=torch.float64)
    return {
        "grpo_loss": lambda m: dvp.grpo_loss(logp, A, m),
        "grpo_loss clipped": lambda m: dvp.grpo_loss(logp, A, m, old_logp=mu),
        "seq_reject_mask": lambda m: dvp.seq_reject_mask(logp, mu, m, cap=1.5),
        "geo_mask": lambda m: dvp.geo_mask(logp, mu, m, lo=0.9, hi=1.1),
        "bias_bound": lambda m: dvp.bias_bound(eps, m),
        "worst_case_bias_bound": lambda m: torch.tensor(dvp.worst_case_bias_bound(eps, m)),
        "mismatch_stats": lambda m: torch.tensor([v for v in dvp.mismatch_stats(logp, mu, m, m, eps).values()
                                                  if not math.isnan(v)]),
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
    return (p_S.gather(-1, tok).squeeze(-1).log(), keep.gather(-1, tok).squeeze(-1),
            1 - torch.where(keep, p, 0.0).sum(-1))


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


@pytest.mark.parametrize("form", ["bool", "csr"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_replay_of_a_kept_set_far_below_the_argmax_equals_the_plain_definition(dtype, form):
    """A replayed set whose logits lie 60-1000 nats below the trainer's argmax (stale weights, a
    bad engine): exp(z - max z) would underflow there (float32: subnormal below ~-87, 0 below ~-104;
    float64: 0 below ~-745); the fast path shifts by the kept set's own max and equals the plain
    definition, with a pruned mass of 1."""
    N, V = 6, 50
    z = rand_logits(N, V, seed=42, dtype=dtype)
    keep = torch.zeros(N, V, dtype=torch.bool)
    keep[:, 10:14] = True
    z[:, :10] += torch.tensor([60.0, 95.0, 110.0, 200.0, 800.0, 1000.0], dtype=dtype)[:, None]  # the argmax, not kept
    tokens = torch.tensor([10, 11, 12, 13, 10, 0])                                         # the last one outside
    g = torch.randn(N, generator=torch.Generator().manual_seed(43), dtype=torch.float64)
    outs = []
    for fn, given in ((dvp.pruned_logprobs_plain, keep), (dvp.pruned_logprobs, keep if form == "bool" else
                                                          to_csr(keep))):
        x = z.clone().requires_grad_()
        out = fn(x, tokens, 0.0, keep=given)
        (out.logp * g.to(dtype)).sum().backward()
        outs.append((out, x.grad))
    (plain, g_plain), (fast, g_fast) = outs
    assert torch.isfinite(fast.logp).all() and torch.isfinite(g_fast).all()
    assert torch.equal(fast.in_set, plain.in_set) and torch.equal(fast.in_set, torch.arange(N) < 5)
    torch.testing.assert_close(fast.logp, plain.logp, **TOL[dtype])
    torch.testing.assert_close(fast.pruned_mass, torch.ones(N, dtype=dtype), rtol=0, atol=0)
    torch.testing.assert_close(fast.pruned_mass, plain.pruned_mass, rtol=0, atol=0)
    torch.testing.assert_close(g_fast, g_plain, **TOL[dtype])
    # no gradient outside the kept set but for the out-of-set token's own z_a (logp = z_a - lse_S)
    assert (g_fast[:5, :10] == 0).all() and (g_fast[:, 14:] == 0).all() and (g_fast[5, 1:10] == 0).all()


def test_a_kept_set_of_masked_tokens_has_no_mass_and_is_rejected():
    z = rand_logits(3, 20, seed=44, dtype=torch.float32)
    z[1, :5] = -math.inf
    keep = torch.zeros(3, 20, dtype=torch.bool)
    keep[:, :5] = True
    for given in (keep, to_csr(keep)):
        with pytest.raises(ValueError, match="no probability mass"):
            dvp.pruned_logprobs(z, torch.zeros(3, dtype=torch.long), 0.0, keep=given)


def test_bad_kept_sets_are_rejected():
    z, tokens = rand_logits(4, 10, seed=12), torch.zeros(4, dtype=torch.long)
    keep = torch.ones(4, 10, dtype=torch.bool)
    ids, offsets = to_csr(keep)
    cases = [(keep[:, :9], "shaped like the logits"),
             (keep.clone().index_fill_(0, torch.tensor([2]), False), "keeps no token"),
             (keep * 2, "keep must be"), ((ids, offsets[:-1]), "offsets"), ((ids.float(), offsets), "integer"),
             ((ids + 10, offsets), r"\[0, 10\)"), ((ids, offsets.flip(0)), "offsets must start at 0"),
             (keep.tolist(), "CSR pair")]
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
    assert s["bias_bound_sum"] == pytest.approx((2.0 * (eps * mask).sum(-1)).mean().item())
    assert s["bias_bound"] == pytest.approx((2.0 * (1 - torch.where(mask, 1 - eps, 1.0).prod(-1))).mean().item())
    assert s["bias_bound_worst"] == pytest.approx(2.0 * mask.sum(-1).max().item() * eps[mask].max().item())
    assert s["pruned_mass_max"] == pytest.approx(eps[mask].max().item())
    assert s["seq_out_of_set_frac"] == pytest.approx((mask & ~in_set).any(-1).double().mean().item())
    r_all = (logp + torch.log1p(-eps) - mu)[mask]                  # every real token, unpruned log pi
    assert s["kl_k3_all"] == pytest.approx((r_all.exp() - 1 - r_all).mean().item())
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


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_logits_are_rejected(bad):
    z = torch.zeros(4, 10)
    z[2, 3] = bad
    with pytest.raises(ValueError, match=r"NaN or \+inf"):
        dvp.pruned_logprobs(z, torch.zeros(4, dtype=torch.long), 0.1)
    w = torch.zeros(10, 5)
    w[3, 0] = bad
    with pytest.raises(ValueError, match=r"NaN or \+inf"):
        dvp.pruned_logprobs_from_hidden(torch.ones(4, 5), w, torch.zeros(4, dtype=torch.long), 0.1)


def test_minus_inf_logits_are_masked_tokens_and_a_row_of_them_is_rejected():
    """-inf marks a token the model may not emit (a padded or masked vocabulary): both paths give it
    probability 0 and leave the rest as without it; a row with no finite logit has no distribution."""
    z = rand_logits(6, 40, seed=40, dtype=torch.float32)
    z[:, 30:] = -math.inf
    tokens = torch.randint(30, (6,), generator=torch.Generator().manual_seed(41))
    for min_p in (0.0, 0.05):
        outs = []
        for fn in (dvp.pruned_logprobs_plain, dvp.pruned_logprobs):
            x = z.clone().requires_grad_()
            out = fn(x, tokens, min_p)
            out.logp.sum().backward()
            outs.append((out, x.grad))
        (plain, g_plain), (fast, g_fast) = outs
        ref = fast if min_p else dvp.pruned_logprobs(z[:, :30], tokens, 0.0)
        torch.testing.assert_close(fast.logp, plain.logp)
        torch.testing.assert_close(fast.logp, ref.logp)
        torch.testing.assert_close(g_fast, g_plain)
        assert torch.isfinite(g_fast).all() and (g_fast[:, 30:] == 0).all()
    z[2] = -math.inf
    with pytest.raises(ValueError, match="all -inf"):
        dvp.pruned_logprobs(z, tokens, 0.1)


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
