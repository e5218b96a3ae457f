"""model.attention and train.loss: each kernel computes the same loss on the same packed batch.

FlexAttention runs forward only on the CPU (its backward is CUDA only), so flex against SDPA is compared on
the loss here; bench/gpu_check.sh compares losses and gradients on a GPU. The chunked loss is compared with
the full one on the loss and on the gradients of the hidden states and of the weight.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, free_endpoint
from trainerd.config import ModelConfig
from trainerd.loss import IGNORE, linear_cross_entropy
from trainerd.model import build_model, summed_loss

SMALL = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


def packed_batch(n: int = 3, L: int = 64, vocab: int = 512, seed: int = 0):
    """Rows of several documents each; the second row starts in the middle of a document."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, L), generator=g)
    pos = torch.cat([torch.arange(20), torch.arange(30), torch.arange(L - 50)]).repeat(n, 1)
    pos[1] = torch.cat([torch.arange(7, 7 + 25), torch.arange(L - 25)])
    labels = ids.clone()
    labels[2, 40:] = IGNORE            # padding rows are ignored targets
    return ids, pos, labels


def test_flex_attention_gives_the_sdpa_loss_on_a_packed_batch():
    torch.manual_seed(0)
    model = build_model(SMALL, 512, 64, 0, attention="sdpa").eval()
    ids, pos, labels = packed_batch()
    with torch.no_grad():
        sdpa = summed_loss(model, ids, pos, labels, attention="sdpa", mixed="no")
        # no document masking: one causal sequence per row (the documents would see each other)
        causal = summed_loss(model, ids, torch.arange(64).repeat(3, 1), labels, attention="sdpa", mixed="no")
        model.config._attn_implementation = "flex_attention"
        flex = summed_loss(model, ids, pos, labels, attention="flex", mixed="no")
    assert abs(causal.item() - sdpa.item()) > 1e-4 * sdpa.item()   # the masks differ, so the test can fail
    torch.testing.assert_close(flex, sdpa, rtol=1e-6, atol=0)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_loss_equals_the_full_loss_and_its_gradients(chunk):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(150, 32, generator=g)
    weight = torch.randn(97, 32, generator=g) * 0.3
    targets = torch.randint(0, 97, (150,), generator=g)
    targets[::5] = IGNORE
    results = {}
    for loss in ("full", "chunked"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        value = linear_cross_entropy(h, w, targets, loss=loss, chunk=chunk)
        (value * 0.5).backward()          # an incoming gradient other than 1 reaches both inputs
        results[loss] = (value.detach(), h.grad, w.grad)
    for full, chunked in zip(results["full"], results["chunked"]):
        torch.testing.assert_close(chunked, full, rtol=1e-4, atol=1e-6)


def test_chunked_loss_under_bf16_autocast_is_the_full_loss():
    torch.manual_seed(0)
    model = build_model(SMALL, 512, 64, 0)
    ids, pos, labels = packed_batch()
    out = {}
    for loss in ("full", "chunked"):
        model.zero_grad()
        value = summed_loss(model, ids, pos, labels, attention="sdpa", mixed="bf16", loss=loss, loss_chunk=50)
        value.backward()
        out[loss] = (value.detach(), model.lm_head.weight.grad.clone(), model.model.layers[0].mlp.up_proj.weight.grad)
    # the same bf16 products summed in another order: equal to bf16 precision
    torch.testing.assert_close(out["chunked"][0], out["full"][0], rtol=2e-3, atol=0)
    for a, b in zip(out["chunked"][1:], out["full"][1:]):
        torch.testing.assert_close(a, b, rtol=0.05, atol=1e-3 * b.abs().max().item())


def test_the_trainer_with_the_chunked_loss_follows_the_full_loss(tmp_path, make_cache):
    """Real trainer runs, deterministic on the CPU: the per-step losses agree to float precision."""
    cache, losses = make_cache(), {}
    for loss in ("full", "chunked"):
        runs = tmp_path / loss
        p = subprocess.run([sys.executable, "-m", "trainerd", "--cache-dir", str(cache), "--run-dir", str(runs),
                            "--new", "a", "--max-steps", "5", "--hidden-size", "32", "--layers", "2", "--heads", "4",
                            "--kv-heads", "2", "--micro-batch-size", "4", "--deterministic", "--threads", "1",
                            "--endpoint", free_endpoint(tmp_path), "--loss", loss, "--set", "train.loss_chunk=100"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        with open(runs / "training_logs" / "a_run_1.jsonl") as f:
            records = [json.loads(line) for line in f]
        assert next(r for r in records if r.get("event") == "started")["loss"] == loss
        losses[loss] = [r["loss"] for r in records if "event" not in r]
    assert len(losses["chunked"]) == 5
    assert losses["chunked"] == pytest.approx(losses["full"], rel=1e-5)
