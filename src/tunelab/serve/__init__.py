"""Serving: streaming generation, terminal chat, and an OpenAI-compatible HTTP server.

Importing this package needs only torch and transformers; the HTTP server (:mod:`tunelab.serve.app`,
:mod:`tunelab.serve.server`) needs ``pip install 'tunelab[serve]'`` and is imported only when used.
"""

from tunelab.serve.generation import Completion, SamplingOptions, generate_stream

__all__ = ["Completion", "SamplingOptions", "generate_stream"]
