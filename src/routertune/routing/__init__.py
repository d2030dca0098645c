"""The routing core: routers that make a decoder layer skip its attention, MLP or whole block.

``config``          RouterConfig: granularity, routed layers, thresholds, capacity regulariser
``router``          the router (one Linear), its keep rule, the straight-through gate
``arch``            the one table of per-family facts, and discovery for other families
``layers``          wrappers around a layer's own sub-layer modules: the decision point, the skip
``routes``          sequence routes stored on the KV cache, reused by every decode step
``token_attention`` attention for the kept tokens of a token-routed layer
``probe``           the attach-time check that a family is routed exactly
``attach``          attach / detach routers, find them, set thresholds
``router_files``    save / load router folders
``observe``         capacity and score observers, runs over data batches

The public names are exported by the package root: ``from routertune import attach_routers``.
"""
