"""What applications use at request time: the CLI, the routing server (profiles,
dynamic batching, backends with cooldowns, feedback, stats), the policy mapper, the
budget ledger and the decision log. It imports the router (``router_pipeline.routers``),
``llm/``, the shared vocabulary and the artifact contract, never a pipeline stage
(labels, training, evaluation) nor Dagster."""
