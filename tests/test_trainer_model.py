"""The model: presets, shapes, one network for training and evaluation, document masking, export."""
from __future__ import annotations

import pytest
import torch

from shared.config import ConfigError
from trainerd.config import ModelConfig
from trainerd.model import PRESETS, build_model, num_params, padded_vocab, varlen_kwargs

SMALL = ModelConfig(preset="tiny", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)


def positions(rows: int, L: int, doc_starts: list[int]) -> torch.Tensor:
    """Position ids that restart at 0 at each document start (as the data plan builds them)."""
    pos = torch.arange(L)
    for s in doc_starts:
        pos[s:] = torch.arange(L - s)
    return pos.repeat(rows, 1)


def test_architecture_is_modern_llama():
    torch.manual_seed(0)
    m = build_model(SMALL, vocab_size=500, seq_len=64, eos_id=0)
    c = m.config
    assert c.vocab_size == 512 == padded_vocab(500)                 # padded to a multiple of 64
    assert m.lm_head.weight is m.model.embed_tokens.weight           # tied embeddings
    assert c.num_key_value_heads == 2 < c.num_attention_heads == 4   # grouped-query attention
    assert c.hidden_act == "silu" and hasattr(m.model.layers[0].mlp, "gate_proj")  # SwiGLU
    assert type(m.model.norm).__name__.endswith("RMSNorm")
    assert c.rope_parameters["rope_theta"] == 10000.0               # RoPE, no learned positions
    assert not any("position" in n for n, _ in m.named_parameters())
    assert c._attn_implementation == "sdpa" and c.use_cache is False


def test_preset_sizes():
    with torch.device("meta"):
        sizes = {name: num_params(build_model(ModelConfig(preset=name), 50257, 512, 50256)) for name in ("124m", "415m", "680m", "1b")}
    assert 110e6 < sizes["124m"] < 135e6, sizes
    assert 390e6 < sizes["415m"] < 440e6, sizes
    assert 650e6 < sizes["680m"] < 710e6, sizes
    assert 1.0e9 < sizes["1b"] < 1.15e9, sizes
    assert PRESETS["tiny"].num_layers == 2


def test_bad_shapes_name_the_field():
    with pytest.raises(ConfigError, match="model.num_kv_heads"):
        build_model(ModelConfig(num_heads=4, num_kv_heads=3), 512, 64, 0)
    with pytest.raises(ConfigError, match="model.hidden_size"):
        build_model(ModelConfig(hidden_size=30, num_heads=4), 512, 64, 0)


def test_train_and_eval_forward_agree():
    torch.manual_seed(0)
    m = build_model(SMALL, 512, 64, 0)
    x = torch.randint(1, 512, (3, 64))
    pos = positions(3, 64, [20, 41])
    m.train()
    a = m(input_ids=x, position_ids=pos).logits
    m.eval()
    with torch.no_grad():
        b = m(input_ids=x, position_ids=pos).logits
    torch.testing.assert_close(a.detach(), b, rtol=1e-5, atol=1e-5)


def test_document_masking():
    """The logits of the 2nd document do not change when the 1st document's tokens change."""
    torch.manual_seed(0)
    m = build_model(SMALL, 512, 64, 0).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, 512, (2, 64), generator=g)
    x[:, 24] = 0  # EOS ends document 1 at position 24; document 2 starts at 25
    y = x.clone()
    y[:, :24] = torch.randint(1, 512, (2, 24), generator=g)
    pos = positions(2, 64, [25])
    with torch.no_grad():
        lx = m(input_ids=x, position_ids=pos).logits
        ly = m(input_ids=y, position_ids=pos).logits
        # without the document positions, attention crosses into document 1 and the logits change
        lz = m(input_ids=y, position_ids=positions(2, 64, [])).logits
        lw = m(input_ids=x, position_ids=positions(2, 64, [])).logits
    assert not torch.allclose(lx[:, :24], ly[:, :24])
    torch.testing.assert_close(lx[:, 25:], ly[:, 25:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(lz[:, 25:], lw[:, 25:], atol=1e-4)
    # and the 2nd document alone, from position 0, gives the same logits: it is a document of its own
    with torch.no_grad():
        alone = m(input_ids=x[:, 25:], position_ids=positions(2, 39, [])).logits
    torch.testing.assert_close(lx[:, 25:], alone, rtol=1e-4, atol=1e-5)


def test_varlen_arguments_cut_at_document_and_row_starts():
    pos = torch.cat([positions(1, 8, [3]), positions(1, 8, [])])
    pos[1, :2] = torch.tensor([5, 6])  # the second row begins in the middle of a document
    pos[1, 2:] = torch.arange(6)
    kw = varlen_kwargs(pos)
    assert kw["cu_seq_lens_q"].tolist() == [0, 3, 8, 10, 16]
    assert kw["max_length_q"] == 6


def test_export_with_save_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    m = build_model(SMALL, 512, 64, 0).eval()
    m.save_pretrained(tmp_path / "hf")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(1, 512, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=x).logits, back(input_ids=x).logits)


def test_activation_checkpointing_recomputes_and_gives_the_same_losses(tmp_path, make_cache, monkeypatch):
    """With train.activation_checkpointing each block runs again in the backward pass (its activations are
    not kept), and the per-step losses of a deterministic CPU run are bitwise those without it."""
    import json
    import subprocess
    import sys

    import torch

    from conftest import ROOT, free_endpoint
    import transformers.models.llama.modeling_llama as llama

    from trainerd.config import ModelConfig
    from trainerd.model import build_model, checkpoint_activations
    calls, forward = [], llama.LlamaMLP.forward   # (module hooks do not fire in a recomputation)
    monkeypatch.setattr(llama.LlamaMLP, "forward", lambda self, x: calls.append(1) or forward(self, x))
    model = build_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2), 512, 64, 0)
    checkpoint_activations(model)
    x = torch.randint(0, 512, (2, 64))
    model(input_ids=x, labels=x).loss.backward()
    assert len(calls) == 4   # 2 layers: each once forward, once again in the backward pass

    cache, losses = make_cache(), {}
    for flag in ("--no-activation-checkpointing", "--activation-checkpointing"):
        runs = tmp_path / flag.strip("-")
        p = subprocess.run([sys.executable, "-m", "trainerd", "--cache-dir", str(cache), "--run-dir", str(runs),
                            "--new", "a", "--max-steps", "6", "--hidden-size", "32", "--layers", "2", "--heads", "4",
                            "--kv-heads", "2", "--micro-batch-size", "4", "--grad-accum", "2", "--deterministic",
                            "--threads", "1", "--endpoint", free_endpoint(tmp_path), flag],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        with open(runs / "training_logs" / "a_run_1.jsonl") as f:
            losses[flag] = [r["loss"] for r in map(json.loads, f) if "event" not in r]
    assert len(losses["--activation-checkpointing"]) == 6
    assert losses["--activation-checkpointing"] == losses["--no-activation-checkpointing"]
