"""Write the model configs the GPU session's end-to-end step builds random-weight models from.

* ``smollm2-135m/config.json``: the demo model's own architecture, as transformers reads it from
  the GGUF file (needs the demo model installed);
* ``llama-2-7b-shapes/config.json``: Llama 2 7B's published hyperparameters (Touvron et al. 2023,
  and the ``meta-llama/Llama-2-7b-hf`` config: hidden 4096, MLP 11008, 32 layers of 32 heads,
  32000-token vocabulary, 4096 positions), the shapes quantization kernels are usually quoted on;
* ``tiny-llama-shapes/config.json``: a 2-layer llama small enough for CPU, whose linears still hold
  whole groups of 128 (hidden 128, MLP 256), for ``scripts/gpu_session.sh --dry-run``.

    python scripts/write_gpu_model_configs.py    # writes scripts/gpu_models/*/config.json
"""
from pathlib import Path

from transformers import LlamaConfig

from qbench.models import DEMO_MODEL, load_model

HERE = Path(__file__).resolve().parent / "gpu_models"

demo = load_model(DEMO_MODEL).model.config
demo.save_pretrained(HERE / "smollm2-135m")
LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
            tie_word_embeddings=False).save_pretrained(HERE / "llama-2-7b-shapes")
LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=320, max_position_embeddings=512, rms_norm_eps=1e-5,
            tie_word_embeddings=False).save_pretrained(HERE / "tiny-llama-shapes")
print("\n".join(str(p) for p in sorted(HERE.glob("*/config.json"))))
