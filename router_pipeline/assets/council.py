"""council_labels: llm-council sessions from the drop folder as extra routing labels."""

from typing import Optional

import dagster as dg
import pandas as pd

from router_pipeline import council
from router_pipeline.assets.metadata import distribution, table
from router_pipeline.paths import council_dir
from router_pipeline.policies import POLICIES

COUNCIL_GROUP = "data"  # part of the data half: it feeds training_examples


class CouncilConfig(dg.Config):
    folder: Optional[str] = None  # None: data/council_sessions (or ROUTER_PIPELINE_COUNCIL_DIR)
    model_tiers: dict[str, str] = dict(council.DEFAULT_TIERS)  # winner model -> medium | large
    min_agreement: float = 0.6
    low_agreement: str = "drop"  # drop | ambiguous
    deadlock: str = "ambiguous"  # drop | ambiguous
    exclude_self_votes: bool = True
    max_query_chars: int = 4000

    def rules(self) -> council.CouncilRules:
        bad = {m: t for m, t in self.model_tiers.items() if t not in council.TIER_POLICY}
        if bad:
            raise dg.Failure(f"model_tiers values must be one of {sorted(council.TIER_POLICY)}: {bad}")
        return council.CouncilRules(dict(self.model_tiers), self.min_agreement, self.low_agreement, self.deadlock,
                                    self.exclude_self_votes, self.max_query_chars)


@dg.asset(group_name=COUNCIL_GROUP, kinds={"pandas"},
          check_specs=[dg.AssetCheckSpec("council_not_in_test", asset="council_labels", blocking=True,
                                         additional_deps=["test_questions"],
                                         description="No council label is for a query of the test split.")])
def council_labels(context: dg.AssetExecutionContext, config: CouncilConfig, test_questions: pd.DataFrame):
    """Every session file in the council folder, recomputed (Borda, agreement) and turned
    into (query, policy, agreement, provenance); bad files are listed, never fatal."""
    folder = config.folder or str(council_dir())
    result = council.read_folder(folder, config.rules())
    labels, in_test = council.drop_test_queries(result.labels, test_questions)
    rejected = pd.DataFrame(result.rejected + in_test, columns=["file", "session", "reason"])
    for r in rejected.head(20).itertuples():
        context.log.warning(f"council {r.file} {r.session}: {r.reason}")
    meta = {
        "folder": folder,
        "files": result.files,
        "labels": len(labels),
        "rejected": len(rejected),
        "rejected_in_test_split": len(in_test),
        "policy_distribution": distribution(labels["policy"], POLICIES),
        "stored_vs_recomputed": len(result.disagreements),
    }
    if not rejected.empty:
        meta["rejected_items"] = table(rejected.head(200))
    if result.disagreements:
        meta["disagreements"] = table(pd.DataFrame(result.disagreements).astype(str).head(200))
    if not labels.empty:
        meta["mean_agreement"] = round(float(labels["agreement"].mean()), 4)
    yield dg.Output(labels, metadata=meta)
    leaked = labels["query_hash"].isin(set(test_questions["query"].map(council.query_hash)))
    yield dg.AssetCheckResult(check_name="council_not_in_test", passed=not leaked.any(),
                              metadata={"test_queries_in_labels": int(leaked.sum())})
