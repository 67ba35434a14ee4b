"""The resources: settings that several assets must agree on, one owner each.

| resource key | what it owns | used by |
|---|---|---|
| ``artifacts`` | where everything is written (the artifact contract) | IO manager, training, evaluation, release |
| ``llm`` | the four LLM roles, retries, concurrency | answers, judgments, query_analyses |
| ``pool`` | the models a pool router chooses among, their backends and prices | pool_answers, pool_routers |
| ``compute`` | where training and evaluation run, GPU prices, progress bars | answers ... released_router |
| ``router_format`` | the completion format (mode) | sft_dataset, dpo_dataset, the training assets |
| ``council_inbox`` | the llm-council drop folder | council_labels, council_sensor |

Defaults come from ``router_pipeline.settings`` (the environment) when the
definitions are built; each can be overridden per run in the launchpad.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Iterator, Literal, Optional

import dagster as dg
import pandas as pd
from pydantic import Field

from router_pipeline import settings as settings_module
from router_pipeline.artifacts import Artifacts
from router_pipeline.defs.config import derived
from router_pipeline.llm import PROMPT_STYLES, PROVIDERS, RoleSpec
from router_pipeline.llm.cache import ResponseCache
from router_pipeline.llm.pool import BACKENDS, Pool, PoolModel, pool_for, pool_from_dict
from router_pipeline.llm.roles import ROLES, Roles, roles_for
from router_pipeline.routers.prompt import DEFAULT_MODE, Mode
from router_pipeline.settings import Compute, Settings



class ArtifactStore(dg.ConfigurableResource):
    """The root everything is written under (the layout: artifacts.py)."""

    root: str = Field(description="Directory for assets, adapters, evaluations, the released router, plots and "
                                     "the LLM response cache (default: ROUTER_PIPELINE_ARTIFACTS or ./artifacts)")

    def layout(self) -> Artifacts:
        return Artifacts(Path(self.root))

    @contextmanager
    def llm_cache(self) -> Iterator[ResponseCache]:
        """The response cache every paid call goes through; closed however the step ends."""
        cache = ResponseCache(self.layout().cache)
        try:
            yield cache
        finally:
            cache.close()


class ParquetIOManager(dg.ConfigurableIOManager):
    """Stores each DataFrame asset as <artifacts>/assets/<key>.parquet, readable without Dagster."""

    artifacts: ArtifactStore

    def path_for(self, key: dg.AssetKey) -> Path:
        return self.artifacts.layout().assets.joinpath(*key.path).with_suffix(".parquet")

    def handle_output(self, context: dg.OutputContext, obj: pd.DataFrame) -> None:
        if not isinstance(obj, pd.DataFrame):
            raise TypeError(f"{context.asset_key.to_user_string()} returned {type(obj).__name__}, expected a DataFrame")
        path = self.path_for(context.asset_key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".parquet.tmp")
        obj.to_parquet(tmp, index=False)
        tmp.replace(path)  # readers never see a half-written file
        context.add_output_metadata({"path": dg.MetadataValue.path(str(path))})

    def load_input(self, context: dg.InputContext) -> pd.DataFrame:
        path = self.path_for(context.asset_key)
        if not path.exists():
            raise FileNotFoundError(f"{context.asset_key.to_user_string()} has not been materialised yet ({path})")
        return pd.read_parquet(path)


class _ModelRole(dg.Config):
    """One LLM role; every other field and default is RoleSpec's."""

    provider: Literal[PROVIDERS] = Field(description="local (transformers) or gemini (google-genai)")  # type: ignore[valid-type]
    model: str = Field(description="Gemini model id, embedded model name (gemma3-270m) or a local checkpoint dir")

    @classmethod
    def of(cls, spec: RoleSpec | None) -> "ModelRole | None":
        return None if spec is None else cls(**vars(spec))


ModelRole = derived(RoleSpec, _ModelRole, name="ModelRole", types={"prompt_style": Literal[PROMPT_STYLES]})


class _LLMRoles(dg.ConfigurableResource):
    """The four LLM roles, configured independently. judge/analyser unset means the
    deterministic grader/analyser. Every other field and default is ``llm.roles.Roles``'."""

    medium: ModelRole
    large: ModelRole
    judge: Optional[ModelRole] = None
    analyser: Optional[ModelRole] = None

    @classmethod
    def of(cls, roles: Roles) -> "LLMRoles":
        return cls(**{f.name: ModelRole.of(getattr(roles, f.name)) if f.name in ROLES else getattr(roles, f.name)
                      for f in fields(Roles)})

    def roles(self) -> Roles:
        def plain_role(name):
            value = getattr(self, name)
            return RoleSpec(**value.model_dump()) if name in ROLES and value is not None else value

        return Roles(**{f.name: plain_role(f.name) for f in fields(Roles)})


LLMRoles = derived(Roles, _LLMRoles, name="LLMRoles")


PoolEntry = derived(PoolModel, name="PoolEntry", types={"backend": Literal[BACKENDS]})  # type: ignore[valid-type]


class ModelPool(dg.ConfigurableResource):
    """The models a pool router chooses among (llm/pool.py): ROUTER_PIPELINE_POOL's file, else
    the profile's pool. Validated as a pool file is (names, backends, prices)."""

    models: list[PoolEntry]

    @classmethod
    def of(cls, pool: Pool) -> "ModelPool":
        return cls(models=[PoolEntry(**vars(m)) for m in pool.models])

    def pool(self) -> Pool:
        return pool_from_dict([m.model_dump() for m in self.models])


class TrainingCompute(dg.ConfigurableResource):
    """Where the router trains (A100s on Modal, or here) and is evaluated (a T4, or here)."""

    where: Compute = "local"
    a100_usd_per_hour: float = 2.10  # Modal's list price for an A100 40GB (training cost estimates)
    t4_usd_per_hour: float = 0.59  # Modal's list price for a T4 (evaluation cost estimates)
    progress: bool = Field(default=True, description="tqdm bars in the compute logs for long work "
                                                         "(model calls, training, routing)")


class RouterFormat(dg.ConfigurableResource):
    """The completion format the router is trained in: the datasets are built in it and
    training refuses a dataset built in another."""

    mode: Mode = Field(default=DEFAULT_MODE, description="fast: the decision only | explained: the decision, then "
                                                            "why | reasoning: why, then the decision")


class CouncilInbox(dg.ConfigurableResource):
    """The folder llm-council session exports are dropped into (read by the sensor and council_labels)."""

    folder: str = Field(description="default: ROUTER_PIPELINE_COUNCIL_DIR or ./council_sessions")

    def path(self) -> Path:
        return Path(self.folder)


def build_resources(s: Settings) -> dict:
    store = ArtifactStore(root=str(s.artifacts_dir))
    return {
        "io_manager": ParquetIOManager(artifacts=store),
        "artifacts": store,
        "llm": LLMRoles.of(roles_for(s)),
        "pool": ModelPool.of(pool_for(s)),
        "compute": TrainingCompute(),
        "router_format": RouterFormat(),
        "council_inbox": CouncilInbox(folder=str(s.council_dir)),
    }


@dg.definitions
def resources() -> dg.Definitions:
    """Built when the definitions load, from the environment of that moment (the profile included)."""
    return dg.Definitions(resources=build_resources(settings_module.load()))
