"""Plug-ins that bring longreach attention to models of other libraries.

``longreach.integrations.hf``: CCA, StreamingLLM and LM-Infinite attention for transformers'
Llama, Qwen2 and Mistral causal LMs (import it explicitly; it registers an attention function).
``hf.PLUGINS`` is the one registry of these methods (options, generation cache, cache growth).
The lm-evaluation-harness adapter is an eval front end: ``longreach.eval.lm_eval``.
"""
