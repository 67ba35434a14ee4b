"""Training the routers: SFT and DPO examples from the labels (``examples``), head
routers by cross-validation (``heads``), QLoRA SFT then DPO with TRL (``lora``), and
where it runs, locally or on Modal (``compute``)."""
