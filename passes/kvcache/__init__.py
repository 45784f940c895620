"""KV-cache passes: a full-sequence decoder becomes one graph that serves prefill and decode.

`rewrite-kv-cache` adds the past/present key and value tensors (the I/O names Hugging Face
Optimum and onnxruntime-genai use), positions computed from the attention mask and a causal
mask that accounts for the past; `slice-last-token-logits` computes the LM head only at the
last position, which is all that generation reads. `GENERATION_PIPELINE` is what
`graphopt optimize` appends for decoders (see `graphopt.driver`).
"""
from graphopt.passes.kvcache import last_token, rewrite  # noqa: F401

GENERATION_PIPELINE = "rewrite-kv-cache,slice-last-token-logits"
