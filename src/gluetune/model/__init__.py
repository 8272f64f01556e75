"""The model: where a base comes from (`sources`: hub id, folder, `pkg:` module, GGUF file), the
classifier built on it and made trainable by the config's method (`classifier`), and a quantized
base under the adapters (`quantization`)."""
