"""council_labels: llm-council sessions from the drop folder as extra routing labels."""

import dagster as dg
import pandas as pd

from router_pipeline.defs.config import derived, plain
from router_pipeline.defs.data import DATA_GROUP
from router_pipeline.defs.metadata import distribution, table
from router_pipeline.defs.resources import CouncilInbox
from router_pipeline.labels import council
from router_pipeline.policies import POLICIES

COUNCIL_GROUP = DATA_GROUP  # part of the data half: it feeds training_examples


class _Council(dg.Config):
    """How llm-council sessions become labels; every field and default is CouncilRules'."""

    def rules(self) -> council.CouncilRules:
        bad = {m: t for m, t in self.model_tiers.items() if t not in council.TIER_POLICY}
        if bad:
            raise dg.Failure(f"model_tiers values must be one of {sorted(council.TIER_POLICY)}: {bad}")
        return plain(self, council.CouncilRules)


CouncilConfig = derived(council.CouncilRules, _Council, name="CouncilConfig")


@dg.asset(group_name=COUNCIL_GROUP, kinds={"pandas"})
def council_labels(context: dg.AssetExecutionContext, config: CouncilConfig, council_inbox: CouncilInbox,
                   test_questions: pd.DataFrame) -> dg.Output[pd.DataFrame]:
    """Every session file in the council folder, recomputed (Borda, agreement) and turned
    into (query, policy, agreement, provenance); bad files are listed, never fatal.
    Sessions about a test question are dropped (training_examples' check verifies it)."""
    folder = str(council_inbox.path())
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
    return dg.Output(labels, metadata=meta)
