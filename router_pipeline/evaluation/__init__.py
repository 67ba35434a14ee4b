"""Evaluation and release: routing metrics on the test split (``metrics``) and the
Dagster-free gate that chooses and checks the released router (``release``)."""
