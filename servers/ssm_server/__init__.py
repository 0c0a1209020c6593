"""ssm-server: an OpenAI-compatible serving engine for Mamba, Mamba2 and hybrids.

Modules, one concern each: ``config`` (settings and memory sizes), ``protocol`` (request
models and OpenAI error bodies), ``textio`` (tokenizers and incremental detokenization),
``sampling``, ``state_pool`` + ``backend_hf`` (the model and its state slots), ``engine``
(the scheduler that owns the device), ``synthetic`` (a model-free engine on a set schedule),
``metrics`` (Prometheus), ``api`` (the aiohttp routes) and ``cli``.
"""
