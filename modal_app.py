"""Modal app for router training and evaluation (the training stages arrive with the
training assets; this module already imports without Modal credentials)."""

import modal

app = modal.App("router-pipeline")
