"""Chunked vocabulary projection vs a plain full-logits computation (float64, bf16, autocast), and a
memory probe showing that no (B, T, V) logits tensor is ever allocated, forward or backward."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from llmtune.losses import causal_lm_loss, entropy_from_hidden, sequence_logps, token_logps


def _inputs(b=3, t=7, h=6, v=11, dtype=torch.float64):
    hidden = torch.randn(b, t, h, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, h, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, v, (b, t))
    labels[0, :3] = -100  # masked prompt
    labels[1, 5:] = -100  # right padding
    labels[2, 1] = -100  # a hole
    return hidden, weight, labels


def _full_reference(hidden, weight, labels):
    """Plain HF-style reference: full logits, float32/64 log-softmax, shift, gather."""
    logits = (hidden @ weight.t()).to(torch.promote_types(hidden.dtype, torch.float32))
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    tgt = labels[:, 1:]
    valid = tgt != -100
    tok = logp.gather(-1, tgt.clamp(min=0)[..., None]).squeeze(-1) * valid
    return tok, valid  # (B, T-1): tok[b, t] = log p(labels[b, t+1])


@pytest.mark.parametrize("chunk_size", [1, 4, None])
def test_causal_lm_loss_matches_full_logits_float64(chunk_size):
    hidden, weight, labels = _inputs()
    loss_sum, n = causal_lm_loss(hidden, weight, labels, chunk_size=chunk_size)
    gh, gw = torch.autograd.grad(loss_sum, (hidden, weight))

    ref = F.cross_entropy(
        (hidden @ weight.t())[:, :-1].reshape(-1, weight.shape[0]), labels[:, 1:].reshape(-1),
        ignore_index=-100, reduction="sum")
    rh, rw = torch.autograd.grad(ref, (hidden, weight))
    assert int(n) == int((labels[:, 1:] != -100).sum())
    assert torch.allclose(loss_sum.double(), ref, rtol=1e-6, atol=0)
    assert torch.allclose(gh, rh, rtol=1e-6, atol=1e-12)
    assert torch.allclose(gw, rw, rtol=1e-6, atol=1e-12)
    assert gh.dtype == torch.float64 and gw.dtype == torch.float64


def test_token_and_sequence_logps_match_full_logits():
    hidden, weight, labels = _inputs()
    tok_ref, valid = _full_reference(hidden, weight, labels)
    tok = token_logps(hidden, weight, labels, chunk_size=2)
    assert tok.shape == labels.shape
    assert torch.all(tok[:, 0] == 0)
    assert torch.allclose(tok[:, 1:].double(), tok_ref, rtol=1e-6, atol=1e-12)

    seq = sequence_logps(hidden, weight, labels, chunk_size=2)
    seq_ref = tok_ref.sum(-1)
    assert torch.allclose(seq.double(), seq_ref, rtol=1e-6)
    avg = sequence_logps(hidden, weight, labels, average=True, chunk_size=5)
    assert torch.allclose(avg.double(), seq_ref / valid.sum(-1), rtol=1e-6)

    coef = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    g = torch.autograd.grad((seq.double() * coef).sum(), (hidden, weight))
    r = torch.autograd.grad((seq_ref * coef).sum(), (hidden, weight))
    for a, b in zip(g, r):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-12)


def test_token_logps_temperature():
    hidden, weight, labels = _inputs()
    tok = token_logps(hidden, weight, labels, chunk_size=3, temperature=0.7)
    logp = torch.log_softmax((hidden @ weight.t())[:, :-1] / 0.7, -1)
    tgt = labels[:, 1:]
    ref = logp.gather(-1, tgt.clamp(min=0)[..., None]).squeeze(-1) * (tgt != -100)
    assert torch.allclose(tok[:, 1:].double(), ref, rtol=1e-6, atol=1e-12)
    g = torch.autograd.grad(tok.sum(), hidden)[0]
    r = torch.autograd.grad(ref.sum(), hidden)[0]
    assert torch.allclose(g, r, rtol=1e-6, atol=1e-12)


def test_no_label_tokens_gives_zero_and_backward_works():
    hidden, weight, _ = _inputs()
    labels = torch.full((3, 7), -100)
    loss_sum, n = causal_lm_loss(hidden, weight, labels)
    assert float(loss_sum.detach()) == 0.0 and int(n) == 0
    loss_sum.backward()
    assert torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)


def test_bf16_weights_and_hidden():
    hidden, weight, labels = _inputs(b=3, t=9, h=16, v=50, dtype=torch.float32)
    hb = hidden.detach().bfloat16().requires_grad_()
    wb = weight.detach().bfloat16().requires_grad_()
    loss_sum, n = causal_lm_loss(hb, wb, labels, chunk_size=4)
    loss_sum.backward()
    # reference: the same bf16 values in float32 arithmetic
    h32 = hb.detach().float().requires_grad_()
    w32 = wb.detach().float().requires_grad_()
    ref = F.cross_entropy((h32 @ w32.t())[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1),
                          ignore_index=-100, reduction="sum")
    ref.backward()
    assert loss_sum.dtype == torch.float32
    assert abs(float(loss_sum.detach()) - float(ref.detach())) <= 2e-2 * abs(float(ref.detach()))
    assert hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
    assert torch.allclose(hb.grad.float(), h32.grad, rtol=5e-2, atol=5e-2)
    assert torch.allclose(wb.grad.float(), w32.grad, rtol=5e-2, atol=5e-2)


def test_autocast_bf16_matches_linear_under_autocast():
    hidden, weight, labels = _inputs(b=3, t=9, h=16, v=50, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seq = sequence_logps(hidden, weight, labels, chunk_size=3)
        logits = F.linear(hidden, weight)  # bf16 under autocast, like model.lm_head
    assert logits.dtype == torch.bfloat16
    logp = torch.log_softmax(logits.float()[:, :-1], -1)
    tgt = labels[:, 1:]
    ref = (logp.gather(-1, tgt.clamp(min=0)[..., None]).squeeze(-1) * (tgt != -100)).sum(-1)
    assert seq.dtype == torch.float32
    assert torch.allclose(seq, ref, rtol=1e-4, atol=1e-4)  # same bf16 matmul, float32 softmax
    g = torch.autograd.grad(seq.sum(), (hidden, weight))
    r = torch.autograd.grad(ref.sum(), (hidden, weight))
    for a, b in zip(g, r):
        assert a.dtype == torch.float32
        assert torch.allclose(a, b, rtol=2e-2, atol=2e-2)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor (elements) any aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel())
        return out


def test_never_materialises_full_logits_forward_or_backward():
    b, t, h, v, chunk = 4, 32, 8, 1000, 8
    hidden = torch.randn(b, t, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    labels = torch.randint(0, v, (b, t))
    probe = _LargestTensor()
    with probe:
        loss_sum, _ = causal_lm_loss(hidden, weight, labels, chunk_size=chunk)
        loss_sum.backward()
        seq = sequence_logps(hidden, weight, labels, chunk_size=chunk)
        seq.sum().backward()
    full = b * (t - 1) * v
    # largest allowed: one chunk of logits (chunk x V) or the weight gradient (V x H)
    assert probe.largest <= max(chunk * v, v * h)
    assert probe.largest * 10 < full
    # the plain computation would allocate the full logits: the probe sees it
    probe2 = _LargestTensor()
    with probe2:
        (hidden @ weight.t()).float()
    assert probe2.largest >= b * t * v


def test_entropy_from_hidden():
    hidden, weight, _ = _inputs()
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    ent = entropy_from_hidden(hidden, weight, mask=mask, chunk_size=2)
    p = torch.softmax(hidden @ weight.t(), -1)
    ref = -(p * torch.log(p)).sum(-1) * mask
    assert not ent.requires_grad
    assert torch.allclose(ent.double(), ref, rtol=1e-6, atol=1e-12)


def test_hand_case_uniform_logits():
    # zero weight -> uniform distribution over V: every label token costs log V nats
    v = 5
    hidden = torch.randn(1, 4, 3)
    weight = torch.zeros(v, 3)
    labels = torch.tensor([[-100, 2, 4, -100]])
    loss_sum, n = causal_lm_loss(hidden, weight, labels)
    assert int(n) == 2
    assert abs(float(loss_sum) - 2 * 1.6094379124341003) < 1e-6  # 2 * ln 5
    assert torch.allclose(token_logps(hidden, weight, labels),
                          torch.tensor([[0.0, -1.6094379124341003, -1.6094379124341003, 0.0]]))


def test_tiny_model_loss_and_grads_match_transformers():
    """causal_lm_loss on our Transformer's hidden states == transformers' LlamaForCausalLM loss (tied)."""
    transformers = pytest.importorskip("transformers")
    from llmtune.models.config import ModelConfig
    from llmtune.models.transformer import Transformer

    hf_cfg = dict(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=True,
                  torch_dtype="float32")
    ours = Transformer(ModelConfig.from_hf_dict(hf_cfg)).float()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg)).float()
    hf.load_state_dict({k: v for k, v in ours.state_dict().items()}, strict=False)
    hf.tie_weights()
    ids = torch.randint(0, 97, (2, 12))
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, 9:] = -100

    hidden = ours(ids)
    loss_sum, n = causal_lm_loss(hidden, ours.lm_head.weight, labels, chunk_size=5)
    (loss_sum / n).backward()
    ref = hf(input_ids=ids, labels=labels).loss
    ref.backward()
    assert abs(float(loss_sum.detach() / n) - float(ref.detach())) < 1e-5
    g_ours = dict(ours.named_parameters())
    for name, p in hf.named_parameters():
        assert torch.allclose(g_ours[name].grad, p.grad, rtol=1e-4, atol=1e-6), name


def test_auto_chunk_rows_fit_the_cpu_cache():
    """chunk_size None: 2**25 logits per chunk on a GPU; on the CPU 2**22 (16 MiB float32), at least 64 rows."""
    from llmtune.kernels.cross_entropy import rows_per_chunk

    assert rows_per_chunk(None, 49152) == 2**25 // 49152 == 682          # no device given: the GPU size
    assert rows_per_chunk(None, 49152, torch.device("cuda")) == 682
    assert rows_per_chunk(None, 49152, torch.device("cpu")) == 2**22 // 49152 == 85
    assert rows_per_chunk(None, 151936, torch.device("cpu")) == 64       # Qwen's vocabulary: the 64-row floor
    assert rows_per_chunk(7, 151936, torch.device("cpu")) == 7
    with pytest.raises(ValueError, match="chunk_size"):
        rows_per_chunk(0, 10)
