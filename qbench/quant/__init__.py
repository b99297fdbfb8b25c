"""What quantization methods are built from, when more than one plugin needs it: shared layers (NF4,
LoRA, a peer library's tensor) and algorithms (GPTQ)."""
