"""DVP inside verl 0.9.1, checked by running verl's own code on the CPU with
docs/verl-0.9.1-dvp.patch applied (the recipe: docs/verl.md):
- the policy loss the trainer calls: verl/workers/utils/losses.py `ppo_loss` ->
  verl/trainer/ppo/core_algos.py `compute_policy_loss_vanilla` -> `agg_loss` (token-mean, verl's default);
- the FSDP engine's log-prob path: verl/workers/engine/fsdp/transformer_impl.py
  `FSDPEngineWithLMHead.prepare_model_inputs` / `prepare_model_outputs`, with a tiny Llama.

`make test-verl` installs verl 0.9.1 and the few packages its import needs into .venv-verl (never
into .venv), applies the patch there and runs this file with DVP_REQUIRE_VERL=1. Without verl every
test here is skipped, with the reason; with DVP_REQUIRE_VERL=1 a missing or unpatched verl fails.

Not run here: FSDP itself. verl 0.9.1 has no CPU platform (verl/plugin/platform registers nvidia,
huawei and amd, and falls back to nvidia), so `FSDPEngine.forward_backward_batch` and
`FSDPEngineWithLMHead.forward_step`, which move each micro-batch to `get_device_id()`, stop at
"Torch not compiled with CUDA enabled". The tests call the two methods the patch changes on the
unwrapped model, and compute `batch_num_tokens` as forward_backward_batch does.
"""
import inspect
import os
import types
import warnings

import pytest
import torch

import dvp

RHO = 0.1           # min_p, as DVP_MIN_P
TEMPERATURE = 0.7   # the rollout temperature verl hands the engine
N_PROMPT, N_RESPONSE = 5, 6
PROMPT_LENS, RESPONSE_LENS = (5, 3, 4, 2), (6, 2, 4, 5)
ADVANTAGES = (1.0, -0.5, 0.8, -1.2)  # one per sequence, broadcast over its tokens as verl's GRPO does


def _patched_verl():
    """verl's modules, or a skip (a failure under DVP_REQUIRE_VERL=1) that says what is missing."""
    required = os.environ.get("DVP_REQUIRE_VERL") == "1"
    try:
        with warnings.catch_warnings():  # one warning per engine whose package is absent; only FSDP is used
            warnings.filterwarnings("ignore", message=".* engine is not available")
            import verl
            from verl.workers.engine.fsdp import transformer_impl
            from verl.workers.utils import losses, padding
            from verl.workers.config import FSDPActorConfig
            from verl.utils import tensordict_utils
            from tensordict import TensorDict
    except ImportError as e:
        if required:
            raise
        pytest.skip(f"verl is not importable ({e!r}); `make test-verl` installs verl 0.9.1 in .venv-verl",
                    allow_module_level=True)
    problem = None
    if verl.__version__ != "0.9.1":
        problem = f"verl {verl.__version__} is installed; docs/verl-0.9.1-dvp.patch is for verl 0.9.1"
    elif "in_set" not in inspect.getsource(losses.ppo_loss):
        problem = "verl 0.9.1 is installed without docs/verl-0.9.1-dvp.patch (`make test-verl` applies it)"
    if problem:
        if required:
            raise RuntimeError(problem)
        pytest.skip(problem, allow_module_level=True)
    return types.SimpleNamespace(engine_cls=transformer_impl.FSDPEngineWithLMHead, ppo_loss=losses.ppo_loss,
                                 padding=padding, actor_config=FSDPActorConfig, tu=tensordict_utils,
                                 TensorDict=TensorDict)


verl = _patched_verl()


@pytest.fixture(autouse=True)
def _min_p(monkeypatch):
    monkeypatch.setenv("DVP_MIN_P", str(RHO))


def masks():
    """attention_mask (B, P + R) of left-padded prompts and right-padded responses, response_mask (B, R)."""
    B = len(PROMPT_LENS)
    attention_mask = torch.zeros(B, N_PROMPT + N_RESPONSE, dtype=torch.long)
    for i, (p, r) in enumerate(zip(PROMPT_LENS, RESPONSE_LENS)):
        attention_mask[i, N_PROMPT - p:N_PROMPT + r] = 1
    return attention_mask, attention_mask[:, N_PROMPT:].clone()


def rollout_batch(prompts, responses, old_logp):
    """A rollout batch as verl's trainer holds it for the actor update: left-padded prompts (B, P),
    right-padded responses (B, R), token-level advantages and old log-probs, converted by
    verl/workers/utils/padding.py `left_right_2_no_padding` to the nested layout the engine and
    ppo_loss read. Also sets what `FSDPEngine.forward_backward_batch` and the trainer add."""
    B = len(PROMPT_LENS)
    attention_mask, response_mask = masks()
    advantages = torch.tensor(ADVANTAGES)[:, None] * response_mask
    data = verl.TensorDict({
        "prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], 1),
        "attention_mask": attention_mask, "position_ids": (attention_mask.cumsum(1) - 1).clamp_min(0),
        "response_mask": response_mask, "advantages": advantages, "old_log_probs": old_logp * response_mask,
    }, batch_size=[B])
    data = verl.padding.left_right_2_no_padding(data)
    # forward_backward_batch: batch_num_tokens = data["loss_mask"].sum(), counted before the forward
    verl.tu.assign_non_tensor(data, batch_num_tokens=int(data["loss_mask"].sum()), dp_size=1,
                              global_batch_size=B, temperature=TEMPERATURE, use_fused_kernels=False,
                              calculate_entropy=False)
    return data


def random_tokens(shape, seed, vocab):
    return torch.randint(1, vocab, shape, generator=torch.Generator().manual_seed(seed))


def actor_config():
    cfg = verl.actor_config(strategy="fsdp", rollout_n=2, ppo_mini_batch_size=len(PROMPT_LENS),
                            ppo_micro_batch_size_per_gpu=len(PROMPT_LENS))
    assert cfg.loss_agg_mode == "token-mean" and cfg.policy_loss.loss_mode == "vanilla", \
        "these tests pin verl's default loss (vanilla PPO clip, token-mean)"
    return cfg


def dvp_reference_loss(logp, in_set, response_mask, old_logp, clip_eps):
    """dvp.grpo_loss on the same tokens: clipped ratio, mask = response & in_set, and the
    normaliser = every real response token, out-of-set ones included (what train.py passes)."""
    return dvp.grpo_loss(logp, torch.tensor(ADVANTAGES), response_mask & in_set, old_logp=old_logp,
                         clip_eps=clip_eps, num_tokens=response_mask.sum())


# --- the policy loss ------------------------------------------------------------------------

def test_verl_ppo_loss_gives_out_of_set_tokens_no_gradient_and_counts_them_in_the_normaliser():
    B, V = len(PROMPT_LENS), 32
    prompts, responses = random_tokens((B, N_PROMPT), 1, V), random_tokens((B, N_RESPONSE), 2, V)
    old_noise = 0.3 * (2 * torch.rand(B, N_RESPONSE, generator=torch.Generator().manual_seed(3)) - 1)

    # Per-token log-probs in the layout the engine returns: one row per token of each packed
    # sequence, labelled with the next token (prepare_model_inputs rolls input_ids by -1).
    lengths = [p + r for p, r in zip(PROMPT_LENS, RESPONSE_LENS)]
    flat_ids = torch.cat([torch.cat([prompts[i, N_PROMPT - p:], responses[i, :r]])
                          for i, (p, r) in enumerate(zip(PROMPT_LENS, RESPONSE_LENS))])
    logits = (3.0 * torch.randn(sum(lengths), V, generator=torch.Generator().manual_seed(4))).requires_grad_()
    lp = dvp.pruned_logprobs(logits, torch.roll(flat_ids, -1), RHO)
    offsets = torch.tensor([0, *lengths]).cumsum(0)

    # Reference by hand: response token k of sequence i is labelled at row offsets[i] + P_i - 1 + k.
    rows = torch.stack([offsets[i] + p - 1 + torch.arange(N_RESPONSE).clamp_max(r - 1)
                        for i, (p, r) in enumerate(zip(PROMPT_LENS, RESPONSE_LENS))])   # (B, R)
    response_mask = masks()[1].bool()
    logp, in_set = lp.logp[rows], lp.in_set[rows]
    old_logp = (logp.detach() + old_noise) * response_mask
    out_of_set = response_mask & ~in_set
    assert 0 < out_of_set.sum() < response_mask.sum(), "the batch must hold in-set and out-of-set tokens"

    data = rollout_batch(prompts, responses, old_logp)
    model_output = {"log_probs": torch.nested.nested_tensor_from_jagged(lp.logp, offsets),
                    "in_set": torch.nested.nested_tensor_from_jagged(lp.in_set.float(), offsets)}
    loss, _ = verl.ppo_loss(actor_config(), model_output, data)
    ref = dvp_reference_loss(logp, in_set, response_mask, old_logp, clip_eps=0.2)
    assert torch.allclose(loss, ref, rtol=1e-6, atol=1e-7), f"verl ppo_loss {loss.item()} != DVP's {ref.item()}"

    in_set_only = dvp.grpo_loss(logp, torch.tensor(ADVANTAGES), response_mask & in_set, old_logp=old_logp)
    assert not torch.isclose(loss, in_set_only), \
        "the normaliser must count out-of-set tokens (batch_num_tokens is counted before the forward)"

    grad, = torch.autograd.grad(loss, logits, retain_graph=True)  # ref shares the log-prob graph
    ref_grad, = torch.autograd.grad(ref, logits)
    assert torch.allclose(grad, ref_grad, rtol=1e-5, atol=1e-8), "verl's gradient differs from DVP's"
    assert (grad[rows[out_of_set]] == 0).all(), "an out-of-set token's logits got a gradient"
    assert grad[rows[response_mask & in_set]].abs().sum() > 0, "in-set tokens must get a gradient"


# --- the FSDP engine's log-prob path --------------------------------------------------------

def tiny_llama(vocab=64, seed=0):
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # peaked next-token distributions, as a trained LM has
    return model


def sampled_batch(model, V, seed=5):
    """Prompts at random; responses sampled from the model (unpruned, temperature 1.5), then one
    token replaced by its least likely one: a sampled token outside the trainer's set."""
    g = torch.Generator().manual_seed(seed)
    B = len(PROMPT_LENS)
    prompts, responses = random_tokens((B, N_PROMPT), 6, V), torch.zeros(B, N_RESPONSE, dtype=torch.long)
    with torch.no_grad():
        for i, (p, r) in enumerate(zip(PROMPT_LENS, RESPONSE_LENS)):
            seq = prompts[i, N_PROMPT - p:]
            for k in range(r):
                z = model(seq[None]).logits[0, -1]
                nxt = z.argmin() if (i, k) == (0, 2) else torch.multinomial((z / 1.5).softmax(-1), 1, generator=g)[0]
                seq = torch.cat([seq, nxt.view(1)])
            responses[i, :r] = seq[p:]
    return prompts, responses


def padded_reference(model, prompts, responses):
    """The README's recipe on the padded batch: logits[:, P-1:-1] / temperature, dvp.pruned_logprobs."""
    attention_mask = masks()[0]
    position_ids = (attention_mask.cumsum(1) - 1).clamp_min(0)
    logits = model(torch.cat([prompts, responses], 1), attention_mask=attention_mask,
                   position_ids=position_ids).logits[:, N_PROMPT - 1:-1] / TEMPERATURE
    return dvp.pruned_logprobs(logits, responses, RHO)


def bare_engine(model):
    """FSDPEngineWithLMHead without __init__ (which needs torch.distributed and a device mesh):
    the attributes its two log-prob methods read, for one process without sequence parallelism."""
    engine = object.__new__(verl.engine_cls)
    engine.module, engine.pad_to_length, engine.use_ulysses_sp = model, False, False
    return engine


@pytest.mark.parametrize("use_remove_padding", [True, False], ids=["packed", "padded"])
def test_verl_fsdp_log_probs_with_dvp_equal_pruned_logprobs_and_train_like_dvp(use_remove_padding):
    V = 64
    model = tiny_llama(V)
    prompts, responses = sampled_batch(model, V)
    ref = padded_reference(model, prompts, responses)
    response_mask = masks()[1].bool()
    assert 0 < (response_mask & ~ref.in_set).sum() < response_mask.sum(), "need in-set and out-of-set tokens"
    assert ref.pruned_mass[response_mask].max() > 1e-3, "min_p must prune something, or log pi_S = log pi"
    old_logp = (ref.logp.detach() + 0.1) * response_mask

    data = rollout_batch(prompts, responses, old_logp)
    verl.tu.assign_non_tensor(data, use_remove_padding=use_remove_padding)
    engine = bare_engine(model)
    model_inputs, output_args = engine.prepare_model_inputs(data)
    model_output = engine.prepare_model_outputs(model(**model_inputs, use_cache=False), output_args, data, None)

    logp = verl.padding.no_padding_2_padding(model_output["log_probs"], data)
    in_set = verl.padding.no_padding_2_padding(model_output["in_set"], data).bool()
    err = (logp - ref.logp)[response_mask].abs().max()
    assert err < 1e-5, f"verl's log-probs with DVP differ from dvp.pruned_logprobs by {err:.2e}"
    assert torch.equal(in_set[response_mask], ref.in_set[response_mask]), "in_set came back misaligned"

    loss, _ = verl.ppo_loss(actor_config(), model_output, data)
    want = dvp_reference_loss(ref.logp, ref.in_set, response_mask, old_logp, clip_eps=0.2)
    assert torch.allclose(loss, want, rtol=1e-5), f"verl's loss {loss.item()} != DVP's {want.item()}"
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(loss, params)
    ref_grads = torch.autograd.grad(want, params)
    for (name, _), g, h in zip(model.named_parameters(), grads, ref_grads):
        assert torch.allclose(g, h, rtol=1e-4, atol=1e-7), f"gradient of {name} differs from DVP's"


def test_patched_engine_refuses_fused_kernels_and_an_unset_min_p(monkeypatch):
    model = tiny_llama()
    prompts, responses = random_tokens((4, N_PROMPT), 7, 64), random_tokens((4, N_RESPONSE), 8, 64)
    data = rollout_batch(prompts, responses, torch.zeros(4, N_RESPONSE))
    engine = bare_engine(model)
    model_inputs, output_args = engine.prepare_model_inputs(data)
    output = model(**model_inputs, use_cache=False)
    monkeypatch.delenv("DVP_MIN_P")
    with pytest.raises(KeyError, match="DVP_MIN_P"):
        engine.prepare_model_outputs(output, output_args, data, None)
    monkeypatch.setenv("DVP_MIN_P", str(RHO))
    verl.tu.assign_non_tensor(data, use_fused_kernels=True)
    with pytest.raises(NotImplementedError, match="use_fused_kernels=False"):
        engine.prepare_model_outputs(output, output_args, data, None)
