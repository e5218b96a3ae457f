"""The next-token loss over the last hidden states, without the full logits where that pays.

`full` multiplies the hidden states by the output embedding once and takes the cross-entropy: the logits of
a micro-batch (positions x vocabulary: 16 x 1024 x 50,304 in fp32 is 3.3 GB, its gradient as much again) exist at once.
`chunked` does the same a chunk of positions at a time and computes the gradients of the hidden states and
of the weight in the forward pass (the softmax minus the one-hot target is the gradient of the logits), so
only one chunk of logits ever exists and the backward pass is two stored tensors scaled by the incoming
gradient. `liger` is Liger-Kernel's Triton version of the same idea.
All three return the summed loss over the positions whose target is not -100; full and chunked can also
return the loss of each position (detached), which the trainer sums per row for the loss of each cache.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def _compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype autocast gives the projection: what the full path's lm_head matmul would run in."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else dtype


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                compute: torch.dtype) -> torch.Tensor:
        w = weight.to(compute)
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        each = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for i in range(0, hidden.shape[0], chunk):
            h, t = hidden[i:i + chunk].to(compute), targets[i:i + chunk]
            logits = (h @ w.t()).float()
            keep = t != IGNORE
            safe = torch.where(keep, t, 0)
            lse = torch.logsumexp(logits, dim=-1)
            each[i:i + chunk] = (lse - logits.gather(1, safe[:, None]).squeeze(1)) * keep
            # d loss / d logits = softmax - onehot(target), zero on ignored positions (in place: one chunk of
            # logits in memory)
            g = logits.sub_(lse[:, None]).exp_()
            g[torch.arange(len(t), device=g.device), safe] -= 1.0
            g *= keep[:, None]
            g = g.to(compute)
            grad_h[i:i + chunk] = (g @ w).to(hidden.dtype)
            grad_w += (g.t() @ h).float()
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        ctx.mark_non_differentiable(each)
        return each.sum(), each

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, _grad_each=None):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), grad_w * grad_out.to(grad_w.dtype), None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, loss: str,
                         chunk: int, per_position: bool = False):
    """Summed cross-entropy of `hidden` [N, D] projected by `weight` [V, D] against `targets` [N]; with
    per_position, (that sum, the [N] loss of each position, detached)."""
    if loss == "full":
        logits = F.linear(hidden, weight).float()
        if not per_position:
            return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
        each = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="none")
        return each.sum(), each.detach()
    if loss == "chunked":
        compute = _compute_dtype(hidden.device.type, hidden.dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            total, each = _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk, compute)
        return (total, each) if per_position else total
    if per_position:
        raise ValueError(f"train.loss = {loss} gives no loss per position")
    if loss == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum")(weight, hidden, targets)
    raise ValueError(f"unknown loss {loss!r}")
