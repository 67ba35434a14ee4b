"""What applications use at request time: the CLI, the routing server (profiles,
dynamic batching, backends with cooldowns, feedback, stats), the policy mapper, the
budget ledger and the decision log. It imports the stage modules, ``llm/`` and the
artifact contract (``router_pipeline.artifacts``), never Dagster."""
