"""The folder Foundry puts on a vLLM server's ``PYTHONPATH``: it holds only
:mod:`foundry_vllm_guard` (standard library only), the ASGI middleware that closes every
route of the server but ``/health`` to requests without the key or with a foreign Host.

vLLM's environment does not have Foundry installed, so the middleware cannot live in a
module that imports Foundry; this folder lets the server import it on its own, as
``foundry_vllm_guard.FoundryGuard``, while Foundry imports the same file as
``foundry_kernel.teachers._vllm_guard.foundry_vllm_guard`` (one source, no copy).
"""

from __future__ import annotations

from pathlib import Path

GUARD_DIR = Path(__file__).resolve().parent
MIDDLEWARE = "foundry_vllm_guard.FoundryGuard"
