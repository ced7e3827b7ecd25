"""Long-context activation memory (llmtune.models.memory): the tiled MLP and the offloaded checkpoint give the
plain path's gradients, and the checkpointed step's peak memory grows at most linearly with the length."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from llmtune.models import ModelConfig, Transformer
from llmtune.models import memory

CFG = dict(vocab_size=97, hidden_size=32, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
           num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)


def _model(lora: bool, dropout: float = 0.0) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**CFG)).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    if lora:
        from llmtune.peft import apply_lora

        apply_lora(model, lora_rank=4, lora_alpha=8, lora_target="all", lora_dropout=dropout)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)   # B = 0 at init would hide errors in the LoRA branch
    return model.train()


def _grads(model: Transformer, ids: torch.Tensor, seed: int = 1) -> tuple[torch.Tensor, dict]:
    from llmtune.losses import causal_lm_loss

    torch.manual_seed(seed)
    loss, n = causal_lm_loss(model(ids), model.lm_head.weight, ids)
    (loss / n).backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def _assert_same(ref, got):
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-6)
    assert ref[1].keys() == got[1].keys() and len(ref[1]) > 0
    for k in ref[1]:
        torch.testing.assert_close(got[1][k], ref[1][k], rtol=1e-6, atol=1e-6, msg=k)


def test_tiled_mlp_equals_the_swiglu_formula():
    """tiled_mlp against down(silu(gate x) * up x) written out with F.linear (Shazeer 2020), float32."""
    torch.manual_seed(0)
    mlp = Transformer(ModelConfig(**CFG)).model.layers[0].mlp.float()
    x = torch.randn(2, 23, 32, requires_grad=True)
    g = torch.randn(2, 23, 32)
    out = memory.tiled_mlp(mlp, x, tile=5)          # 46 rows: 9 full tiles and one of 1
    out.backward(g)
    got = [x.grad.clone()] + [p.grad.clone() for p in mlp.parameters()]
    x2 = x.detach().clone().requires_grad_(True)
    for p in mlp.parameters():
        p.grad = None
    ref = F.linear(F.silu(F.linear(x2, mlp.gate_proj.weight)) * F.linear(x2, mlp.up_proj.weight),
                   mlp.down_proj.weight)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    ref.backward(g)
    for a, b in zip(got, [x2.grad] + [p.grad for p in mlp.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_checkpointed_tiled_mlp_gives_the_plain_gradients(monkeypatch, lora):
    ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(3))
    ref = _grads(_model(lora), ids)
    calls = []
    monkeypatch.setattr(memory, "TILE_TOKENS", 7)                # 38 rows > 7: every layer's MLP tiles
    real = memory._TiledMLP.apply
    monkeypatch.setattr(memory._TiledMLP, "apply", lambda *a: calls.append(a[1]) or real(*a))
    model = _model(lora)
    model.gradient_checkpointing_enable()
    _assert_same(ref, _grads(model, ids))
    assert calls and set(calls) == {7} and len(calls) >= 2 * CFG["num_hidden_layers"]   # forward + recompute


class _FakeOffload:
    """The stand-in for pinned CPU memory: a device-to-device copy, counted."""

    def __init__(self):
        self.packed = self.unpacked = 0

    def pack(self, x):
        self.packed += 1
        return x.clone()

    def unpack(self, stored, device):
        self.unpacked += 1
        return stored.to(device, copy=True)


@pytest.mark.parametrize("lora,dropout,tile", [(False, 0.0, 7), (True, 0.0, 7), (True, 0.2, 10_000)],
                         ids=["full-tiled", "lora-tiled", "lora-dropout"])
def test_offloaded_checkpoint_gives_the_plain_gradients(monkeypatch, lora, dropout, tile):
    """Offloaded checkpointing with a fake offload equals the plain path (dropout: the same masks replayed)."""
    ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(4))
    ref = _grads(_model(lora, dropout), ids)
    monkeypatch.setattr(memory, "TILE_TOKENS", tile)
    model = _model(lora, dropout)
    model.gradient_checkpointing_enable()
    model.offload_activations = fake = _FakeOffload()
    _assert_same(ref, _grads(model, ids))
    assert fake.packed == fake.unpacked == CFG["num_hidden_layers"]


def test_offload_true_on_the_cpu_is_plain_checkpointing():
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(5))
    ref = _grads(_model(True), ids)
    model = _model(True)
    model.gradient_checkpointing_enable()
    model.offload_activations = True
    _assert_same(ref, _grads(model, ids))


_PEAK = textwrap.dedent("""
    import json, sys, torch
    from llmtune.models import ModelConfig, Transformer
    from llmtune.losses import causal_lm_loss
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)
    model = Transformer(cfg).train()
    model.gradient_checkpointing_enable()
    def step(t):
        ids = torch.randint(0, 512, (1, t))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, n = causal_lm_loss(model(ids), model.lm_head.weight, ids)
        loss.backward()
        model.zero_grad(set_to_none=True)
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])   # kB
    step(256)
    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:   # reset the peak (VmHWM) to the current RSS
        f.write("5")
    step(int(sys.argv[1]))
    print(json.dumps((status("VmHWM") - base) / 1024))
""")


def _peak_mib(t: int) -> float:
    env = dict(os.environ, MALLOC_ARENA_MAX="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _PEAK, str(t)], capture_output=True, text=True, env=env,
                         timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_checkpointed_step_peak_memory_grows_at_most_linearly():
    """Peak RSS above the warmed-up process (the kernel's peak mark reset right before the step, so an earlier
    peak of the imports cannot hide it), at T and 2T (separate processes): at most 2x plus a tolerance
    (25% and 8 MiB of allocator noise). Storing T x T attention scores (4 x 8192^2 bf16 = 512 MiB at 2T) or
    the whole (T, intermediate) activations of every layer would break it."""
    t = 4096
    small, large = _peak_mib(t), _peak_mib(2 * t)
    assert small > 4, (small, large)                              # the step itself was measured
    assert large <= 2 * small * 1.25 + 8, f"peak {small:.1f} MiB at {t} tokens, {large:.1f} MiB at {2 * t}"


def test_llamafactory_keys_map_to_offloaded_checkpointing_or_explain(capsys):
    from llmtune.config import parse_config

    cfg = parse_config({"use_unsloth_gc": True, "enable_liger_kernel": True}, command=None)
    assert cfg.offload_activations is True
    err = capsys.readouterr().err
    assert "enable_liger_kernel" in err and "use_kernels" in err and "chunked loss" in err


_MALLOC = textwrap.dedent("""
    import ctypes, json, sys
    import torch
    from llmtune.models.memory import set_mmap_threshold
    libc = ctypes.CDLL(None)
    class Info(ctypes.Structure):   # struct mallinfo2, <malloc.h>
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                  "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc.mallinfo2.restype = Info
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    applied = set_mmap_threshold() if sys.argv[1] == "call" else None
    libc.free(libc.malloc(8 << 20))      # a freed mmapped 8 MiB block: glibc's dynamic threshold rises to 8 MiB
    before = libc.mallinfo2().hblks
    p = libc.malloc(1 << 20)
    mapped = libc.mallinfo2().hblks - before
    libc.free(p)
    sums = []
    for n in (64, 300, 1000, 300, 64):    # tensors below and above the threshold, allocated and freed in turn
        a = torch.ones(n, n, dtype=torch.bfloat16)
        sums.append(float((a.float() @ a.float())[0, 0]))
    print(json.dumps({"applied": applied, "mapped": mapped, "sums": sums}))
""")


@pytest.mark.skipif(not (sys.platform.startswith("linux") and hasattr(__import__("ctypes").CDLL(None),
                                                                      "gnu_get_libc_version")),
                    reason="glibc only")
@pytest.mark.parametrize("mode,env,applied,mapped", [
    ("none", None, None, 0),          # glibc's default: after the 8 MiB free, 1 MiB comes from the heap
    ("call", None, True, 1),          # threshold fixed at 128 KiB: 1 MiB is its own mmap
    ("call", "65536", False, 1),      # the user's MALLOC_MMAP_THRESHOLD_ wins; glibc applied it at start
], ids=["default", "set", "env-wins"])
def test_set_mmap_threshold_makes_large_blocks_mmapped(mode, env, applied, mapped):
    """Independent expectation from glibc's documented rules (mallopt(3), M_MMAP_THRESHOLD and the dynamic
    threshold), observed through mallinfo2's count of mmapped blocks; tensors still compute n x n sums of ones."""
    envs = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    if env:
        envs["MALLOC_MMAP_THRESHOLD_"] = env
    out = subprocess.run([sys.executable, "-c", _MALLOC, mode], capture_output=True, text=True, env=envs,
                         timeout=300, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"applied": applied, "mapped": mapped, "sums": [64.0, 300.0, 1000.0, 300.0, 64.0]}


def test_set_mmap_threshold_refuses_bad_values_without_raising():
    assert memory.set_mmap_threshold(-1) is False
    assert memory.set_mmap_threshold(64 << 20) is False     # above glibc's 32 MiB ceiling
    assert memory.set_mmap_threshold("131072") is False


@pytest.mark.parametrize("device,cutoff,called", [("cpu", 4096, True), ("cpu", 2049, True), ("cpu", 2048, False),
                                                  ("cpu", 512, False), ("cuda", 8192, False)])
def test_long_context_malloc_sets_the_threshold_only_for_long_cpu_rows(monkeypatch, device, cutoff, called):
    """The rule measured in docs/performance.md: CPU and rows longer than one MLP tile (2048 tokens)."""
    calls = []
    monkeypatch.setattr(memory, "set_mmap_threshold", lambda *a: calls.append(a) or True)
    assert memory.long_context_malloc(device, cutoff) is called
    assert calls == ([()] if called else [])


def test_trainer_with_gradient_checkpointing_applies_the_long_context_malloc(monkeypatch, tmp_path):
    from llmtune.train import trainer as trainer_mod

    seen = []
    monkeypatch.setattr(trainer_mod, "long_context_malloc", lambda dev, cut: seen.append((dev, cut)) or False)
    rows = [{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": [1, 2, 3]}]
    for gc in (False, True):
        trainer_mod.Trainer(_model(True), {"stage": "sft", "output_dir": str(tmp_path), "max_steps": 1,
                                           "report_to": "none", "cutoff_len": 8192, "gradient_checkpointing": gc},
                            rows)
    assert seen == [("cpu", 8192)]
