"""Methods decide what trains: full, freeze, lora, qlora, prompt_tuning (registry: ``methods.registry``)."""
