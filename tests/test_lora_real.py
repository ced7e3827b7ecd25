"""On the real SmolLM2-135M GGUF: an adapter saved by llmtune gives, in peft on the transformers model, the
logits llmtune computes (1e-3, DESIGN.md's real-model tolerance), and peft's adapter loads back in ours."""

import warnings

import pytest
import torch

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import PeftModel  # noqa: E402

from llmtune.peft import LoraLinear, apply_lora, load_adapter, save_adapter  # noqa: E402

warnings.filterwarnings("ignore")


@pytest.fixture(scope="module")
def models(real_model_path, hf_real_model_copy):
    hf = hf_real_model_copy()
    try:
        from llmtune.models.loader import load_model
    except ImportError:
        load_model = None
    if load_model is not None:
        ours = load_model(str(real_model_path), dtype="float32").eval()
    else:  # before the loader exists: copy transformers' weights into our Transformer
        from llmtune.models.config import ModelConfig
        from llmtune.models.transformer import Transformer

        ours = Transformer(ModelConfig.from_hf_dict(hf.config.to_dict())).eval()
        ours.load_state_dict(hf.state_dict(), strict=False)
        ours.tie_weights()
    hf_sd = hf.state_dict()
    for k, v in ours.state_dict().items():  # weights bit-equal before comparing logits
        assert torch.equal(v, hf_sd[k]), k
    return hf, ours


IDS = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11, 2, 198, 1, 4093, 198, 19556, 17]])


def randomize_b(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear):
                for b in m.lora_B.values():
                    b.weight.copy_(torch.randn(b.weight.shape, generator=g) * 0.02)


@pytest.mark.real
def test_real_model_adapter_matches_peft(models, tmp_path, real_model_path):
    hf, ours = models
    apply_lora(ours, lora_rank=8, lora_target="all", use_dora=True)
    randomize_b(ours)
    with torch.no_grad():
        mine = ours.lm_head(ours(IDS)).float()
    save_adapter(ours, tmp_path / "ad", base_model_name_or_path=str(real_model_path))
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "ad")).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=IDS).logits.float()
        with peft_model.disable_adapter():
            base = peft_model(input_ids=IDS).logits.float()
    assert (theirs - base).abs().max() > 0.05  # the adapter matters
    torch.testing.assert_close(mine, theirs, atol=1e-3, rtol=0)
    # and back: peft's saved copy loads into a second adapter slot of ours with the same logits
    peft_model.save_pretrained(str(tmp_path / "peft"))
    load_adapter(ours, tmp_path / "peft", adapter_name="from_peft")
    with torch.no_grad():
        again = ours.lm_head(ours(IDS)).float()
    torch.testing.assert_close(again, theirs, atol=1e-3, rtol=0)
