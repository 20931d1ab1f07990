"""How the engine works inside other libraries' models: peft (LoRA) and FSDP2 sharding.

- :mod:`~hfprune.integrations.peft_names`: a PeftModel's modules by the plain model's names.
- :mod:`~hfprune.integrations.lora`: keeping LoRA updates sparse where their base weights are pruned, and
merging.
- :mod:`~hfprune.integrations.sharding`: parameters FSDP2 splits across processes, and collectives over their
parts.
"""
