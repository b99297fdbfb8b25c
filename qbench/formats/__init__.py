"""Other libraries' file formats, read and written: bitsandbytes' NF4 safetensors layout, PEFT adapters."""
