"""QLoRA on CPU: the base in 4-bit NF4 (bitsandbytes), LoRA on top, the code a GPU runs."""

import pytest
from transformers import TrainerCallback

from router_pipeline.routers.lora import LoraRouter
from router_pipeline.training.examples import build_sft_dataset
from router_pipeline.training.lora import TrainConfig, train_sft
from router_pipeline_tests.support import training_examples


class KeepModel(TrainerCallback):
    """Holds on to the model as training leaves it."""

    model = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = model


def test_qlora_trains_on_a_4bit_base_on_cpu_and_routes_the_same_after_reload(tiny_model_dir, tmp_path):
    import bitsandbytes as bnb

    keep = KeepModel()
    cfg = TrainConfig(base_model=tiny_model_dir, quantization="4bit", batch_size=4, grad_accum=1, epochs=2,
                      learning_rate=2e-3, save_steps=1000)
    result = train_sft(build_sft_dataset(training_examples()), cfg, tmp_path, callbacks=[keep])

    # Under each LoRA layer (7 per block, 2 blocks) the base's linear layer is 4-bit NF4, double-quantised.
    bases = [m.base_layer for m in keep.model.modules() if hasattr(m, "lora_A")]
    assert len(bases) == 14 and all(isinstance(b, bnb.nn.Linear4bit) for b in bases)
    assert all(b.weight.quant_state.quant_type == "nf4" and b.weight.quant_state.nested for b in bases)
    assert result.quantization == "4bit" and result.device == "cpu" and result.steps == 4
    assert result.losses[-1][1] < result.losses[0][1]

    # Reloaded from the adapter folder onto a fresh 4-bit base, it routes as the trained model does.
    queries = list(training_examples()["query"])
    router = LoraRouter(result.adapter_dir, quantization="4bit")
    reloaded = router.route_batch(queries)
    router.model = keep.model.eval()
    trained = router.route_batch(queries)
    assert [d.policy for d in reloaded] == [d.policy for d in trained]
    for a, b in zip(reloaded, trained):  # bf16 products: close, not bit-identical (2e-4 seen)
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-3)

    # On an fp32 base (the adapter merged) it routes too: every query gets a decision.
    on_fp32 = LoraRouter(result.adapter_dir).route_batch(queries)
    assert all(d.parse_ok and sum(d.probabilities.values()) == pytest.approx(1.0) for d in on_fp32)
