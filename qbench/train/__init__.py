"""Fine-tuning for the methods that train (lora, qlora): the training loop and the paged AdamW."""
