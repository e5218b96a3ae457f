"""The model: transformers' LlamaForCausalLM (RMSNorm, RoPE, SwiGLU, grouped-query attention, tied embeddings).

Built from transformers' own classes so that a checkpoint exports with `save_pretrained` and loads with
`AutoModelForCausalLM`. Document masking: the batch's `position_ids` restart at 0 at every document start;
with `attention_mask=None` and `use_cache=False`, transformers builds a mask from them that keeps attention
inside each document: a dense block-diagonal one for SDPA, a block mask for FlexAttention. With flash-attention
the batch is flattened to one row and the varlen kernel gets the document boundaries as `cu_seq_lens`.
"""
from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from shared.config import ConfigError

from .config import PRESETS, ModelConfig, Preset
from .loss import IGNORE, linear_cross_entropy

# bf16 dense peak FLOP/s by device name, for MFU
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
              "A10G": 125e12, "4090": 165e12, "3090": 71e12}


def padded_vocab(vocab_size: int, multiple: int = 64) -> int:
    return int(math.ceil(vocab_size / multiple) * multiple)


# model.attention -> transformers' attn_implementation
ATTN_IMPLEMENTATION = {"sdpa": "sdpa", "flex": "flex_attention", "flash": "flash_attention_2"}


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_attention(cfg: ModelConfig, cuda: bool) -> str:
    """sdpa, flex or flash: model.attention (or the older model.flash_attention) on this machine."""
    choice = cfg.attention
    if choice == "auto" and cfg.flash_attention is not None:
        choice = "flash" if cfg.flash_attention else "sdpa"
    if choice == "auto":
        if cuda and flash_attn_available():
            return "flash"
        return "flex" if cuda and triton_available() else "sdpa"
    if choice == "flash" and not (cuda and flash_attn_available()):
        raise ConfigError("model.attention = flash needs flash_attn installed and CUDA")
    if choice == "flex" and not cuda:
        raise ConfigError("model.attention = flex needs CUDA: FlexAttention has no backward pass on the CPU")
    return choice


def check_kernels(cfg: ModelConfig, loss: str, cuda: bool, caches: int = 1) -> None:
    """Liger-Kernel's parts, when asked for, need the package and CUDA (its kernels are Triton); its loss gives
    no loss per row, which several caches report per cache."""
    if loss == "liger" and caches > 1:
        raise ConfigError("train.loss = liger gives no loss per cache: with several caches use full or chunked")
    wanted = [name for name, on in (("model.liger_kernels", cfg.liger_kernels), ("train.loss = liger",
                                                                                loss == "liger")) if on]
    if wanted and not (cuda and importlib.util.find_spec("liger_kernel") is not None):
        raise ConfigError(f"{wanted[0]} needs liger-kernel installed (pip install liger-kernel) and CUDA")


class PackedLlama(LlamaForCausalLM):
    """LlamaForCausalLM whose forward, given next-token `targets`, returns their summed loss instead of the
    logits: the loss then runs inside the forward that DDP, FSDP2 and torch.compile wrap (FSDP2 gathers the
    output embedding only there), and train.loss chooses how (trainerd.loss). Its weights and config are
    those of LlamaForCausalLM, so checkpoints and exports are a plain Llama."""

    def forward(self, input_ids=None, position_ids=None, targets=None, loss: str = "full", loss_chunk: int = 0,
                per_position: bool = False, **kwargs):
        if targets is None:
            return super().forward(input_ids=input_ids, position_ids=position_ids, **kwargs)
        hidden = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **kwargs).last_hidden_state
        return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight, targets.reshape(-1),
                                    loss=loss, chunk=loss_chunk, per_position=per_position)


def resolve(cfg: ModelConfig) -> Preset:
    """The preset with the config's overrides applied; checks the shapes fit together."""
    p = PRESETS[cfg.preset]
    hidden = cfg.hidden_size or p.hidden_size
    heads = cfg.num_heads or p.num_heads
    kv = cfg.num_kv_heads or min(p.num_kv_heads, heads)
    inter = cfg.intermediate_size or (p.intermediate_size if hidden == p.hidden_size else
                                      int(math.ceil(hidden * 8 / 3 / 64) * 64))
    from .config import ConfigError
    if hidden % heads:
        raise ConfigError(f"model.hidden_size ({hidden}) must be a multiple of model.num_heads ({heads})")
    if heads % kv:
        raise ConfigError(f"model.num_kv_heads ({kv}) must divide model.num_heads ({heads})")
    if (hidden // heads) % 2:
        raise ConfigError(f"model.hidden_size / model.num_heads must be even for RoPE (got {hidden // heads})")
    return Preset(hidden, cfg.num_layers or p.num_layers, heads, kv, inter)


def llama_config(cfg: ModelConfig, vocab_size: int, seq_len: int, eos_id: int, attention: str = "sdpa") -> LlamaConfig:
    p = resolve(cfg)
    return LlamaConfig(
        vocab_size=padded_vocab(vocab_size),
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_layers,
        num_attention_heads=p.num_heads,
        num_key_value_heads=p.num_kv_heads,
        head_dim=p.hidden_size // p.num_heads,
        hidden_act="silu",                    # SwiGLU: down(silu(gate(x)) * up(x))
        max_position_embeddings=seq_len,
        initializer_range=cfg.init_std,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=True,
        use_cache=False,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        attn_implementation=ATTN_IMPLEMENTATION[attention],
    )


def build_model(cfg: ModelConfig, vocab_size: int, seq_len: int, eos_id: int, attention: str = "sdpa"
                ) -> PackedLlama:
    """A freshly initialised model (weights from torch's current RNG: seed before calling)."""
    model = PackedLlama(llama_config(cfg, vocab_size, seq_len, eos_id, attention))
    model.config.use_cache = False
    return model


def model_from_config_dict(d: dict, attention: str = "sdpa") -> PackedLlama:
    """The model described by a checkpoint's model_config.json (weights uninitialised until loaded)."""
    config = LlamaConfig.from_dict(d)
    config._attn_implementation = ATTN_IMPLEMENTATION[attention]
    model = PackedLlama(config)
    model.config.use_cache = False
    return model


def set_up_torch(train, cuda: bool) -> None:
    """This process's threads, determinism, matmul precision and compilation (train: the [train] config
    section; train.compile is turned off where it cannot work)."""
    from .rundir import TRITON_CACHE, log
    # compiled kernels stay with the run folder, not in a per-user temporary folder that runs share and
    # that Windows cleans up
    os.environ.setdefault("TRITON_CACHE_DIR", str(Path(train.run_dir).resolve() / TRITON_CACHE))
    if train.compile and cuda and importlib.util.find_spec("triton") is None:
        # torch.compile generates Triton kernels for CUDA (on the CPU it generates C++ and needs no Triton)
        log.warning("torch.compile off: Triton is not installed (on Windows: pip install triton-windows)")
        train.compile = False
    if train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if train.threads:
        torch.set_num_threads(train.threads)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def build(cfg: ModelConfig, tokenizer: dict, seq_len: int, cuda: bool, checkpoint: Path | None = None
          ) -> tuple[PackedLlama, str]:
    """(the model, its attention: sdpa, flex or flash): freshly initialised from torch's current RNG (seed
    before calling), or the one a checkpoint folder describes with its weights loaded."""
    from . import checkpoint as ck
    attention = resolve_attention(cfg, cuda)
    if checkpoint is not None:
        model = model_from_config_dict(ck.read_json(checkpoint, "model_config.json"), attention)
        ck.load_weights(checkpoint, model)
    else:
        model = build_model(cfg, int(tokenizer["vocab_size"]), seq_len, int(tokenizer["eos_id"]), attention)
    if model.config.vocab_size < int(tokenizer["vocab_size"]):
        raise ConfigError(f"the model's vocabulary ({model.config.vocab_size}) is smaller than the tokenizer's "
                          f"({tokenizer['vocab_size']})")
    if cfg.liger_kernels:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama(rope=True, swiglu=True, rms_norm=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False, model=model)
    return model, attention


def checkpoint_activations(model: LlamaForCausalLM) -> None:
    """Recompute each decoder layer in the backward pass (non-reentrant torch checkpoint) instead of keeping
    its activations."""
    if hasattr(model, "activation_checkpointing_enable"):   # the name in transformers 5
        model.activation_checkpointing_enable()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def num_params(model: torch.nn.Module, non_embedding: bool = False) -> int:
    """Parameters, tied ones counted once; non_embedding leaves out the (tied) token embedding."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    if non_embedding:
        total -= model.get_input_embeddings().weight.numel()
    return total


def flops_per_token(config: LlamaConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 N (matmuls, forward + backward) plus attention 12 L H Q T / 2 (causal).

    The attention term assumes full causal attention over seq_len; with document masking the kernel
    may do less work, so MFU is an upper-bound-free, honest lower estimate of the useful work.
    """
    head_dim = config.hidden_size // config.num_attention_heads
    attn = 12 * config.num_hidden_layers * config.num_attention_heads * head_dim * seq_len / 2
    return 6 * n_params + attn


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (and the tied embedding), none on norms."""
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def summed_loss(model, ids: torch.Tensor, pos: torch.Tensor, labels: torch.Tensor, *, attention: str, mixed: str,
                loss: str = "full", loss_chunk: int = 0, host_pos: torch.Tensor | None = None, per_row: bool = False):
    """The summed next-token loss of one micro-batch [n, L] (target of position t: token t + 1, -100 ignored)
    of a PackedLlama, with document masking: SDPA and flex build their masks from position_ids; flash-attention
    gets the rows as one sequence with the document boundaries (from `host_pos`, a host copy of pos, to spare a
    device sync). Training and evaluation both call this, so they compute the same loss. per_row: (that loss,
    the [n] summed loss of each row, detached), for the loss per cache of several caches."""
    n = ids.shape[0]
    # each row's last position has no next token in the row
    targets = torch.cat([labels[:, 1:], labels.new_full((n, 1), IGNORE)], dim=1)
    kwargs = {}
    if attention == "flash":
        kwargs = {k: (v.to(ids.device) if torch.is_tensor(v) else v)
                  for k, v in varlen_kwargs(pos if host_pos is None else host_pos).items()}
        ids, pos, targets = ids.reshape(1, -1), pos.reshape(1, -1), targets.reshape(1, -1)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=mixed == "bf16"):
        out = model(input_ids=ids, position_ids=pos, targets=targets, loss=loss, loss_chunk=loss_chunk,
                    per_position=per_row, **kwargs)
    return (out[0], out[1].view(n, -1).sum(1)) if per_row else out


def varlen_kwargs(position_ids: torch.Tensor) -> dict:
    """Flash-attention varlen arguments for a batch flattened to one row.

    A new segment starts at position 0 and at the start of each row (a row may begin mid-document).
    Computed on the host from the CPU tensor: max_length must be a Python int for the kernel.
    """
    pos = position_ids.reshape(-1).cpu()
    n, L = position_ids.shape
    starts = (pos == 0)
    starts[::L] = True
    idx = torch.nonzero(starts).view(-1)
    cu = torch.cat([idx, torch.tensor([pos.numel()])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max_len, "max_length_k": max_len}


def peak_flops(device: torch.device) -> float | None:
    """The card's dense bf16 peak FLOP/s, for MFU (None off CUDA or for a card not in PEAK_FLOPS)."""
    if device.type != "cuda":
        return None
    name = _device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


_names: dict = {}


def _device_name(device: torch.device) -> str:
    if device not in _names:
        _names[device] = torch.cuda.get_device_name(device)
    return _names[device]


def weights_digest(model: torch.nn.Module) -> str:
    """xxh64 of this rank's weights: the whole model, or under FSDP2 this rank's shards (no collective)."""
    import xxhash
    from torch.distributed.tensor import DTensor
    h = xxhash.xxh64()
    for name, t in sorted(model.state_dict().items()):
        if isinstance(t, DTensor):
            t = t.to_local()
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
