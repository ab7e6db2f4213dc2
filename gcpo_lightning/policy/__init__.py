"""The models: loading (shipped, local, Hub), LoRA, 4-bit quantization and FSDP2 sharding."""
