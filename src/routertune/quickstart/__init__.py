"""The main job on embedded defaults, end to end, into a report a person can read.

    routertune quickstart                      # default model, builtin data, ~20 min on 2 CPU cores
    routertune quickstart --limit 100 --train_samples 2000 --output_dir reports/bigger

1. router-tune the default model (SmolLM2-135M-Instruct) on the builtin instruction mix,
   holding out examples for an LM-loss check;
2. evaluate, on the nine offline tasks, the dense model, the routed model and the static
   attention-drop baseline at the routed model's measured compute, all on one model object;
3. time dense vs routed vs attention drop (prefill and decode, KV-cache bytes);
4. write ``report.md``, ``results.json`` and plots into the output folder.
"""

from routertune.quickstart.recipe import Quickstart, QuickstartSettings, run_quickstart

__all__ = ["Quickstart", "QuickstartSettings", "run_quickstart"]
