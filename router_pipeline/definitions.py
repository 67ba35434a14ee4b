"""The Dagster Definitions of router_pipeline (loaded by workspace.yaml and the CLI)."""

from __future__ import annotations

import dagster as dg

from router_pipeline.assets.data import DATA_ASSETS, DATA_GROUP
from router_pipeline.assets.evaluation import EVALUATION_ASSETS, EVALUATION_GROUP
from router_pipeline.assets.training import TRAINING_ASSETS, TRAINING_GROUP
from router_pipeline.automation import council_refresh_job, council_sensor, retraining_job, weekly_retraining
from router_pipeline.resources import ParquetIOManager, default_roles

data_job = dg.define_asset_job("data_job", selection=dg.AssetSelection.groups(DATA_GROUP),
                               description="Questions to SFT/DPO datasets.")
training_job = dg.define_asset_job("training_job", selection=dg.AssetSelection.groups(TRAINING_GROUP),
                                   description="SFT then DPO of the router on the configured compute.")
evaluation_job = dg.define_asset_job("evaluation_job", selection=dg.AssetSelection.groups(EVALUATION_GROUP),
                                     description="Evaluate the trained router on the test split; release it if its checks pass.")

defs = dg.Definitions(
    assets=DATA_ASSETS + TRAINING_ASSETS + EVALUATION_ASSETS,
    jobs=[data_job, training_job, evaluation_job, council_refresh_job, retraining_job],
    schedules=[weekly_retraining],
    sensors=[council_sensor],
    resources={
        "io_manager": ParquetIOManager(),
        "llm": default_roles(),
    },
)
