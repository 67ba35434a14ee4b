"""The router the pipeline ships and the server runs: the contract every kind keeps
(``contract``), the kinds (``head``, ``lora``) and how a saved folder names its kind
(``registry``), the frozen encoders (``features``) and the prompt format (``prompt``).
Nothing here trains or imports a pipeline stage."""
