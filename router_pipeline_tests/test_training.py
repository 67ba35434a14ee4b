"""Router training on a tiny random-weight Gemma 3 (real tokenizer): seconds, not hours."""

import json

import pandas as pd
import pytest
import torch

from router_pipeline.training.lora import (
    DPO_DEFAULTS, TrainConfig, sample_rows, sft_trainer, supervised_positions_only, train_dpo, train_sft,
)
from router_pipeline.training.examples import build_dpo_dataset, build_sft_dataset
from router_pipeline.artifacts import TRAINING_FILE
from router_pipeline_tests.support import training_examples

def _tiny(tiny_model_dir, **kw):
    base = dict(base_model=tiny_model_dir, batch_size=4, grad_accum=1, save_steps=1000)
    return base | kw


def test_sft_loss_is_on_the_completion_only(tiny_model_dir, tmp_path):
    sft = build_sft_dataset(training_examples(), "explained")  # distinct completions: each is found in its row
    trainer, tokenizer, _ = sft_trainer(sft, TrainConfig(**_tiny(tiny_model_dir)), tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    checked = 0
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        text = tokenizer.decode(ids[labels != -100])
        row = sft[sft["completion"].map(lambda c: c in text)]
        assert len(row) == 1, text  # the supervised span is exactly one completion (+ EOS)
        prompt_len = len(tokenizer(row["prompt"].iloc[0])["input_ids"])
        real = ids != tokenizer.pad_token_id
        first_real = int(real.nonzero()[0])
        assert (labels[first_real : first_real + prompt_len] == -100).all()  # every prompt token masked
        assert (labels[first_real + prompt_len :][real[first_real + prompt_len :]] != -100).all()
        checked += 1
    assert checked == 4


def test_logits_at_supervised_positions_only_give_the_full_loss(tiny_model_dir, tmp_path):
    """The CPU speed-up (LM head on supervised positions only) must not change the loss:
    compare with a plain full-logits cross-entropy of the same batch."""
    trainer, _, _ = sft_trainer(build_sft_dataset(training_examples()), TrainConfig(**_tiny(tiny_model_dir)), tmp_path)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model = trainer.model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        full = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                                                 ignore_index=-100)
        with supervised_positions_only():
            compact = trainer.compute_loss(model, dict(batch))
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    assert 0 < supervised < batch["labels"].numel() / 4  # fast mode: a few positions out of each sequence
    assert float(compact) == pytest.approx(float(full), rel=1e-4)


def test_max_rows_trains_on_a_stable_seeded_sample():
    rows = build_sft_dataset(training_examples())
    cfg = TrainConfig(max_rows=5)
    picked = sample_rows(rows, cfg, "sft")
    assert len(picked) == 5 and list(picked.index) == sorted(picked.index)
    more = pd.concat([rows, rows.assign(prompt=rows["prompt"] + " extra")], ignore_index=True)
    assert set(sample_rows(more, cfg, "sft")["prompt"]) & set(picked["prompt"])  # mostly the same rows
    assert len(sample_rows(rows, TrainConfig(), "sft")) == len(rows)


def _preference(adapter_dir, base_dir, dpo_rows):
    """Mean log-prob margin chosen - rejected under an adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()

    def logp(prompt, completion):
        p = tok(prompt, return_tensors="pt")["input_ids"]
        full = tok(prompt + completion, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(full).logits[0, :-1]
        targets = full[0, 1:]
        lp = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
        return float(lp[p.shape[1] - 1 :].sum())

    return sum(logp(r.prompt, r.chosen) - logp(r.prompt, r.rejected) for r in dpo_rows.itertuples()) / len(dpo_rows)


def test_sft_then_dpo_prefers_chosen_more(tiny_model_dir, tmp_path):
    examples = training_examples()
    sft_rows, dpo_rows = build_sft_dataset(examples), build_dpo_dataset(examples)
    sft = train_sft(sft_rows, TrainConfig(**_tiny(tiny_model_dir, epochs=2, learning_rate=2e-3)), tmp_path / "sft")
    assert sft.steps == 4 and len(sft.losses) == 4 and sft.device == "cpu"
    assert sft.losses[-1][1] < sft.losses[0][1]  # it learns the format
    meta = json.loads((tmp_path / "sft" / "adapter" / TRAINING_FILE).read_text())
    assert meta["config"]["lora_r"] == 16 and meta["rows"] == len(sft_rows) and len(meta["data_hash"]) == 16
    dpo = train_dpo(dpo_rows, sft.adapter_dir, TrainConfig(**{**DPO_DEFAULTS, **_tiny(tiny_model_dir, epochs=2, learning_rate=5e-3)}),
                    tmp_path / "dpo")
    assert dpo.metrics["reward_accuracy"] > 0.5 and dpo.metrics["reward_margin"] > 0
    before = _preference(sft.adapter_dir, tiny_model_dir, dpo_rows)
    after = _preference(dpo.adapter_dir, tiny_model_dir, dpo_rows)
    assert after > before
    assert (tmp_path / "dpo" / "adapter" / "adapter_model.safetensors").exists()


def test_training_resumes_from_its_last_checkpoint(tiny_model_dir, tmp_path):
    rows = build_sft_dataset(training_examples())
    first = train_sft(rows, TrainConfig(**_tiny(tiny_model_dir, max_steps=2, save_steps=1)), tmp_path)
    assert first.steps == 2
    # A longer run in the same folder continues from checkpoint-2 instead of starting over.
    # A much larger learning rate would change the step-2 loss had it started over.
    second = train_sft(rows, TrainConfig(**_tiny(tiny_model_dir, max_steps=3, save_steps=1, learning_rate=0.05)), tmp_path)
    assert second.steps == 3 and second.losses[:2] == first.losses and len(second.losses) == 3
