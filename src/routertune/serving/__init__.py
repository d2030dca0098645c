"""Serving routed models in vLLM (attn_sequence, the paper's MindSkip).

What lives where:

* ``families.py``: the one table of vLLM model classes we wrap (no vLLM import).
* ``folder.py``: the served folder (the model's files, a config that names our architecture, the
  router files), checked against the model before any engine starts (no vLLM import).
* ``vllm_model.py``: the routed model classes: vLLM's own ``<Family>ForCausalLM`` whose routed
  layers' ``self_attn`` is wrapped; the per-request route runs inside one opaque custom op.
* ``vllm_worker.py``: the worker class that gives the model its requests' identities and reports
  routes through ``collective_rpc``.
* ``plugin.py``: the ``vllm.general_plugins`` entry point that registers the architectures.
* ``middleware.py``: the OpenAI server's middleware that checks routertune's request arguments and
  adds the skipped layers to each response.
* ``extra_args.py``: the per-request arguments (``routertune_dense``, ``routertune_threshold``).

vLLM runs in its own environment (``scripts/install_serve.sh``): it pins a transformers older than
ours. Only these modules (plus ``io_utils`` and ``version``) are imported there.
"""
