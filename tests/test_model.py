"""The LLaMA model and its size presets."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from smet_lab.config import ConfigError, ModelConfig
from smet_lab.model import PRESETS, LLaMA, count_parameters, model_preset, validate_model

# Total parameters (millions) of the released configs with the T5 vocabulary (32000), as tabulated in
# the SMET paper (arXiv 2606.00888, the released model configs), independently of this code.
PAPER_TOTALS_M = {"llama_60m": 58.1, "llama_130m": 134.1, "llama_240m": 239.4, "llama_350m": 368.0, "llama_1b": 1339.1,
                  "llama_7b": 6738.4}


@pytest.mark.parametrize("name,total", PAPER_TOTALS_M.items())
def test_preset_sizes_match_the_paper_configs(name, total):
    cfg = model_preset(name, vocab_size=32000)
    assert count_parameters(cfg) / 1e6 == pytest.approx(total, abs=0.06)


@pytest.mark.parametrize("name", ["tiny", "small", "llama_9m", "llama_20m"])
def test_count_parameters_equals_built_model(name):
    cfg = model_preset(name, vocab_size=256)
    validate_model(cfg)
    assert LLaMA(cfg).num_parameters() == count_parameters(cfg)


def test_every_preset_passes_validation():
    for name in PRESETS:
        validate_model(model_preset(name, vocab_size=32000))  # raises ConfigError on an odd or fractional head size


def test_tiny_model_parameter_count_by_hand():
    # tiny: dim 64, ffn 176, 2 layers, vocab 256. Embedding and untied output 256*64 each, final norm 64;
    # per layer wq, wk, wv, wo 64*64 each, w1, w3 64*176 and w2 176*64, two norms of 64.
    per_layer = 4 * 4096 + 3 * 11264 + 2 * 64
    assert LLaMA(model_preset("tiny", vocab_size=256)).num_parameters() == 2 * 16384 + 64 + 2 * per_layer == 133440


def test_preset_table_from_issue():
    expect = {"llama_9m": (128, 352, 4, 4), "llama_20m": (256, 688, 4, 4), "llama_35m": (384, 1024, 6, 8),
              "llama_60m": (512, 1376, 8, 8), "llama_130m": (768, 2048, 12, 12), "llama_240m": (768, 2416, 24, 16),
              "llama_350m": (1024, 2736, 24, 16),
              "llama_1b": (2048, 5461, 24, 32), "llama_7b": (4096, 11008, 32, 32)}
    for name, (d, f, L, H) in expect.items():
        c = model_preset(name)
        assert (c.dim, c.ffn_dim, c.n_layers, c.n_heads) == (d, f, L, H)


def test_unknown_preset_and_bad_dims():
    with pytest.raises(ConfigError, match="model.name"):
        model_preset("llama_3m")
    with pytest.raises(ConfigError, match="model.n_heads"):
        validate_model(dataclasses.replace(model_preset("tiny"), n_heads=3))
    with pytest.raises(ConfigError, match="model.dim"):
        validate_model(dataclasses.replace(model_preset("tiny"), dim=0))


def test_causal_and_loss_matches_manual_cross_entropy():
    torch.manual_seed(0)
    cfg = model_preset("tiny", vocab_size=50, seq_len=12)
    model = LLaMA(cfg).eval()
    x = torch.randint(0, 50, (2, 12))
    logits = model(x)
    x2 = x.clone()
    x2[:, 7:] = (x2[:, 7:] + 1) % 50  # change the future
    logits2 = model(x2)
    assert torch.allclose(logits[:, :7], logits2[:, :7], atol=1e-6)
    assert not torch.allclose(logits[:, 7:], logits2[:, 7:])
    y = torch.randint(0, 50, (2, 12))
    logp = torch.log_softmax(logits, -1)
    manual = -logp.gather(-1, y.unsqueeze(-1)).mean()
    assert model(x, y).item() == pytest.approx(manual.item(), rel=1e-5)


def test_rope_makes_attention_scores_depend_on_relative_position():
    from smet_lab.model.llama import apply_rope, rope_tables

    cos, sin = rope_tables(8, 32, 10000.0)
    q = torch.randn(8)
    k = torch.randn(8)
    rq = apply_rope(q.expand(1, 1, 32, 8).contiguous(), cos, sin)[0, 0]
    rk = apply_rope(k.expand(1, 1, 32, 8).contiguous(), cos, sin)[0, 0]
    # <R(m) q, R(n) k> depends only on m - n.
    assert torch.dot(rq[5], rk[2]).item() == pytest.approx(torch.dot(rq[20], rk[17]).item(), rel=1e-4)
    assert torch.allclose(rq[0], q)  # position 0 is not rotated
    assert rq.norm(dim=-1).allclose(q.norm().expand(32), rtol=1e-5)  # rotations keep the norm


def test_untied_head_and_init():
    model = LLaMA(model_preset("small", vocab_size=256))
    assert model.output.weight.data_ptr() != model.tok_embeddings.weight.data_ptr()
    w = model.layers[0].attention.wq.weight
    assert w.std().item() == pytest.approx(0.02, rel=0.05)
    assert (model.norm.weight == 1).all()


def test_activation_checkpointing_keeps_only_the_blocks_inputs():
    """With checkpoint_blocks the forward saves for backward far fewer bytes (the blocks' internals are
    recomputed in backward); the gradients are the same."""
    torch.manual_seed(0)
    model = LLaMA(ModelConfig(dim=64, n_layers=4, n_heads=4, ffn_dim=176, vocab_size=256, seq_len=32))
    tokens = torch.randint(256, (4, 33))

    def saved_bytes_and_grads(on: bool):
        model.checkpoint_blocks = on
        model.zero_grad(set_to_none=True)
        saved = [0]

        def pack(t):
            saved[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        return saved[0], [p.grad.clone() for p in model.parameters()]

    plain, grads = saved_bytes_and_grads(False)
    checkpointed, grads_ckpt = saved_bytes_and_grads(True)
    assert checkpointed < plain / 3
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ckpt))


def test_the_meta_model_has_the_real_models_shapes_and_draws_nothing():
    """The pre-flight checks build the model on the meta device: the same parameter and buffer shapes as
    the real one, with no initialisation drawn (meta's normal_ and arange import torch._dynamo, ~2 s
    of every `--plan` and of every refusal)."""
    import subprocess
    import sys

    real = LLaMA(model_preset("tiny", vocab_size=300))
    code = ("import sys, torch; from smet_lab.model import LLaMA, model_preset\n"
            "with torch.device('meta'):\n    m = LLaMA(model_preset('tiny', vocab_size=300))\n"
            "print(sorted((n, tuple(t.shape), t.is_meta) for n, t in [*m.named_parameters(), *m.named_buffers()]))\n"
            "print('torch._dynamo' in sys.modules)")
    shapes, dynamo = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                    timeout=120).stdout.splitlines()
    assert shapes == str(sorted((n, tuple(t.shape), True) for n, t in [*real.named_parameters(), *real.named_buffers()]))
    assert dynamo == "False"


def _small_model(seed: int = 0, seq_len: int = 16) -> LLaMA:
    torch.manual_seed(seed)
    return LLaMA(ModelConfig(name="t", dim=32, n_layers=2, n_heads=2, ffn_dim=64, seq_len=seq_len, vocab_size=50,
                             init_std=0.5)).eval()  # a wide init: distinct, confident next-token choices


def test_greedy_generation_takes_the_argmax_of_one_full_forward_at_every_position():
    model = _small_model()
    prompt = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    out = model.generate(prompt, 10, temperature=0)
    assert out.shape == (2, 15) and torch.equal(out[:, :5], prompt)
    with torch.no_grad():  # causal: position t's logits in one pass over the whole sequence are what step t saw
        logits = model(out)
    assert torch.equal(out[:, 5:], logits[:, 4:-1].argmax(-1))


def test_sampling_stays_in_the_top_k_is_seeded_and_top_1_is_greedy():
    model = _small_model()
    prompt = torch.tensor([[7, 7, 2]])
    draw = lambda seed, **kw: model.generate(prompt, 12, generator=torch.Generator().manual_seed(seed), **kw)
    out = draw(0, temperature=1.0, top_k=3)
    assert torch.equal(out, draw(0, temperature=1.0, top_k=3))
    with torch.no_grad():
        top3 = model(out)[0, 2:-1].topk(3).indices  # the 3 most likely after each prefix
    assert all(tok in allowed for tok, allowed in zip(out[0, 3:].tolist(), top3.tolist()))
    assert torch.equal(draw(1, temperature=1.0, top_k=1), model.generate(prompt, 12, temperature=0))
    # With the whole vocabulary allowed and a high temperature the choices are not all the argmax: it samples.
    assert not torch.equal(draw(0, temperature=5.0), model.generate(prompt, 12, temperature=0))


def test_generation_past_the_context_keeps_the_last_seq_len_tokens():
    model = _small_model(seq_len=8)
    prompt = torch.arange(20).unsqueeze(0) % 50  # longer than the context
    out = model.generate(prompt, 4, temperature=0)
    assert out.shape == (1, 24)
    with torch.no_grad():  # the first new token is the argmax after the last 8 prompt tokens alone
        expected = model(prompt[:, -8:])[0, -1].argmax()
    assert out[0, 20] == expected
