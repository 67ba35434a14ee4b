"""Training assets through Dagster, and the Modal path up to the SDK boundary."""

import dagster as dg
import modal
import pandas as pd
import pytest

from router_pipeline.routers.lora import LoraRouter
from router_pipeline.training import compute
from router_pipeline.training.lora import DPO_DEFAULTS, TrainConfig
from router_pipeline.training.examples import build_dpo_dataset, build_sft_dataset
from router_pipeline_tests.support import FakeRemote, training_examples, write_asset


def test_modal_app_imports_without_credentials_and_lists_its_gpus(monkeypatch):
    monkeypatch.delenv("MODAL_TOKEN_ID", raising=False)
    monkeypatch.delenv("MODAL_TOKEN_SECRET", raising=False)
    import modal_app

    functions = {n: f for n, f in vars(modal_app).items() if isinstance(f, modal.Function)}
    assert set(functions) == {"train_sft", "train_dpo", "evaluate_router"}
    assert modal_app.app.name == compute.APP_NAME
    # What the functions are declared with (Modal keeps it private on the Function).
    assert modal_app.TRAIN_KW["gpu"] == "A100" and set(modal_app.TRAIN_KW["volumes"]) == {"/vol", "/datasets"}


def test_launch_without_credentials_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("MODAL_TOKEN_ID", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(compute.ModalCredentialsMissing, match="MODAL_TOKEN_ID"):
        compute.launch_modal("sft", build_sft_dataset(training_examples()), TrainConfig(), tmp_path / "dest")


def test_modal_launch_hands_over_the_data_and_brings_the_adapter_back(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-test")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-test")
    monkeypatch.setenv("ROUTER_MODAL_RUNS_ROOT", str(tmp_path / "volume"))
    monkeypatch.setenv("ROUTER_MODAL_DATASETS_ROOT", str(tmp_path / "datasets"))
    monkeypatch.setattr(modal.Function, "from_name", FakeRemote)
    FakeRemote.calls = []
    examples = training_examples()
    sft_rows, dpo_rows = build_sft_dataset(examples), build_dpo_dataset(examples, rejected_per_example=1)
    # 4-bit QLoRA, as the A100 trains: the functions' bodies run here with the config they would get there.
    tiny = dict(base_model=tiny_model_dir, batch_size=4, grad_accum=1, max_steps=1, quantization="4bit")

    sft, sft_gpu_s = compute.launch_modal("sft", sft_rows, TrainConfig(**tiny), tmp_path / "adapters" / "sft")
    app_name, fn_name, (records, config, run) = FakeRemote.calls[0]  # SFT has no parent adapter
    assert (app_name, fn_name) == ("router-pipeline", "train_sft")
    assert records == sft_rows[["prompt", "completion"]].to_dict("records")
    assert config == TrainConfig(**tiny).to_dict() and run.startswith("sft-")
    assert (tmp_path / "volume" / run / "checkpoints").is_dir()  # checkpoints live on the Volume
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "datasets" / f"{run}.parquet"),
                                  sft_rows[["prompt", "completion"]].reset_index(drop=True))
    assert (tmp_path / "adapters" / "sft" / "adapter_config.json").exists()
    assert (tmp_path / "adapters" / "sft" / "router_training.json").exists()
    assert sft.steps == 1 and sft_gpu_s > 0 and sft.adapter_dir == str(tmp_path / "adapters" / "sft")
    assert sft.quantization == "4bit"

    dpo, _ = compute.launch_modal("dpo", dpo_rows, TrainConfig(**{**DPO_DEFAULTS, **tiny}), tmp_path / "adapters" / "dpo",
                                  sft_adapter=tmp_path / "adapters" / "sft")
    _, fn_name, (records, config, run, parent) = FakeRemote.calls[1]
    assert fn_name == "train_dpo" and set(records[0]) == {"prompt", "chosen", "rejected"}
    assert parent[:2] == b"\x1f\x8b"  # the SFT adapter travels as a gzip tarball
    assert config["learning_rate"] == 5e-5 and dpo.stage == "dpo" and dpo.quantization == "4bit"
    assert (tmp_path / "adapters" / "dpo" / "adapter_model.safetensors").exists()


def test_training_assets_materialise_in_4bit_with_metadata(tiny_model_dir, artifacts, defs, resources):
    """SFT then DPO as QLoRA on CPU through the assets; the adapter routes on a 4-bit base and on an fp32 one."""
    examples = training_examples()
    for key, frame in (("sft_dataset", build_sft_dataset(examples)), ("dpo_dataset", build_dpo_dataset(examples, rejected_per_example=1))):
        write_asset(resources["io_manager"], key, frame)
    tiny = {"base_model": tiny_model_dir, "batch_size": 4, "grad_accum": 1, "max_steps": 1, "quantization": "4bit"}
    result = dg.materialize(
        list(defs.assets), selection=["sft_adapter", "dpo_adapter"], instance=dg.DagsterInstance.ephemeral(),
        resources=resources,
        run_config={"ops": {"sft_adapter": {"config": tiny}, "dpo_adapter": {"config": tiny}}},
    )
    assert result.success
    meta = {m.asset_key.to_user_string(): m.materialization.metadata for m in result.get_asset_materialization_events()}
    for stage in ("sft", "dpo"):
        m = meta[f"{stage}_adapter"]
        assert m["steps"].value == 1 and m["device"].value == "cpu" and m["compute"].value == "local"
        assert m["quantization"].value == "4bit"
        assert "data:image/png;base64," in m["loss_curve"].value
        assert (artifacts / "adapters" / stage / "adapter_config.json").exists()
    assert 0.0 <= meta["dpo_adapter"]["reward_accuracy"].value <= 1.0
    assert (artifacts / "plots" / "dpo_loss.png").stat().st_size > 1000
    queries = list(examples["query"][:4])
    for quantization in ("4bit", "none"):
        decisions = LoraRouter(artifacts / "adapters" / "dpo", quantization=quantization).route_batch(queries)
        assert [d.query for d in decisions] == queries and all(d.parse_ok for d in decisions)
