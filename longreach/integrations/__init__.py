"""Plug-ins that bring longreach attention to models of other libraries.

``longreach.integrations.hf``: CCA, StreamingLLM and LM-Infinite attention for transformers'
Llama, Qwen2 and Mistral causal LMs (import it explicitly; it registers an attention function).
"""
