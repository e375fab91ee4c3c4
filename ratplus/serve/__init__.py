"""``ratplus serve``: an OpenAI-compatible HTTP server with continuous batching.

``admission`` (KV bytes of a request from the cache's slot arithmetic) -> ``engine`` (the batching
loop over ``RATPlusLM.decode_step``) -> ``app`` (FastAPI routes, OpenAI schemas, errors) + ``page``
(the playground). Needs the ``serve`` extra: ``pip install 'ratplus[serve]'``.
"""
