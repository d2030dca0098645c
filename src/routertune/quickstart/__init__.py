"""The main job on embedded defaults, end to end, into a report a person can read.

    routertune quickstart                      # default model, builtin data, ~25 min on 2 CPU cores
    routertune quickstart --limit 100 --train_samples 2000 --output_dir reports/bigger

1. router-tune the default model (SmolLM2-135M-Instruct) on the builtin instruction mix,
   holding out examples for an LM-loss check;
2. evaluate, on the nine offline tasks, the dense model, the routed model at its own capacity
   and recalibrated to each of ``calibrated_capacities`` (thresholds only), and beside each the
   static attention-drop baseline of the same measured compute, all on one model object and the
   same documents (paired differences);
3. time each against dense at the benchmark contexts (prefill and decode, KV-cache bytes);
4. write ``report.md`` (the trade-off table first), ``results.json`` and plots.
"""

from routertune.quickstart.recipe import Quickstart, QuickstartSettings, run_quickstart

__all__ = ["Quickstart", "QuickstartSettings", "run_quickstart"]
