"""``ratplus serve``: an OpenAI-compatible HTTP server with continuous batching.

``admission`` (KV bytes of a request from the cache's slot arithmetic) -> ``engine`` (the batching
loop over ``RATPlusLM.decode_step``) -> ``app`` (FastAPI routes) over ``schemas`` (strict request
bodies), ``guard`` (API key, body limit), ``completions`` + ``responses`` (engine events to OpenAI
responses: text, logprobs, echo, SSE), ``constrain`` (response_format), ``errors``; + ``page``
(the playground). docs/ARCHITECTURE.md has the pool and prefix-cache modules too. Needs the
``serve`` extra: ``pip install 'ratplus[serve]'``.
"""
