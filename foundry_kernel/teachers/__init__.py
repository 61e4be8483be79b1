"""Teachers: everything that answers "what would the teacher predict here?".

Modules (private): ``_interface`` (the :class:`Teacher` interface and its in-process,
vLLM and cached implementations), ``_targets`` (sparse top-k targets), ``_client`` (the
HTTP client of a vLLM server), ``_vllm_server`` (the vLLM server Foundry starts and owns),
``_logit_cache`` (the offline logit cache), ``_builtin`` (the built-in teacher Foundry
trains and caches).
"""
