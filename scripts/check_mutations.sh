#!/usr/bin/env bash
# Applies each deliberate routing bug of issue 10 to the library, runs the oracle tests, restores the
# file, and prints how many tests failed. Every line must report failures; "N passed" alone means the
# tests no longer catch that bug.
#   bash scripts/check_mutations.sh [pytest args, default tests/test_exactness.py]
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
TESTS=("$@"); [ ${#TESTS[@]} -gt 0 ] || TESTS=(tests/test_exactness.py)
mutate() {  # name, file, text, replacement [, pytest args instead of the default ones]
  local tests=("${TESTS[@]}"); [ $# -gt 4 ] && tests=("${@:5}")
  local backup; backup=$(mktemp)
  cp "$2" "$backup"
  "$PY" - "$2" "$3" "$4" <<'PY' || { cp "$backup" "$2"; echo "$1: text not found in $2"; return; }
import sys
path, old, new = sys.argv[1:]
text = open(path).read()
if old not in text:
    sys.exit(1)
open(path, "w").write(text.replace(old, new))
PY
  local result; result=$(OMP_NUM_THREADS=1 "$PY" -m pytest -q -p no:warnings -p no:cacheprovider "${tests[@]}" 2>&1 | tail -1)
  cp "$backup" "$2"; rm -f "$backup"
  echo "$1: $result"
}
mutate "keep iff score > threshold" src/routertune/routing/router.py "(scores - self.threshold) >= 0" "(scores - self.threshold) > 0"
mutate "sequence mean ignores padding" src/routertune/routing/layers.py "masked_sequence_mean(x, valid)" "masked_sequence_mean(x, None)"
# The previous code placed unmasked kept queries at `order + (S - T)`; the current code follows the
# kernel's own rule for an omitted mask. The same bug class, two ways:
mutate "kept queries of a one-token step masked as a chunk" src/routertune/routing/token_attention.py "        if T > 1:" "        if True:"
mutate "kept queries placed after the key slots" src/routertune/routing/token_attention.py "<= order.view(B, 1, max_kept, 1)" "<= (order + (S - T)).view(B, 1, max_kept, 1)" \
  tests/test_families.py -k test_static_cache_equals_dynamic_cache
mutate "cache batch ops not mirrored" src/routertune/routing/routes.py "        _mirror_batch_ops(cache, store)" "        pass"
# Issue 11: a static cache's 4-D mask must still hand the padding to the routers.
mutate "padding of a static cache's 4-D mask ignored" src/routertune/routing/attach.py \
  "else _padding_of_4d_mask(mask, args, kwargs)" "else None" \
  tests/test_families.py -k left_padded
# Issue 11: a threshold that fixes the decision must not read it back from the device.
mutate "fixed sequence decision read back from the device" src/routertune/routing/routes.py \
  "        n_kept = (batch if fixed else 0) if fixed is not None else int(keep.sum())" "        n_kept = int(keep.sum())" \
  tests/test_routing.py -k host_read
# Issue 11: compiled, a scored routed sub-layer is one opaque op; traced as Python instead, every
# route pattern is a guard (one graph per pattern).
mutate "compiled routed attention traced instead of an op" src/routertune/routing/layers.py \
  "        return compiled.call_routed_attention(self, hidden, token_mask, routing_mask, cache, args, kwargs)" \
  "        return self.run_routed(hidden, token_mask, routing_mask, cache, args, kwargs)" \
  tests/test_compile.py -k "one_graph or recipe"
# Issue 15 (vLLM serving): under vLLM's compilation the route must run inside the opaque op; traced
# as Python, the warm-up trace's branch is frozen for every request.
mutate "vLLM routed attention traced instead of an op" src/routertune/serving/vllm_model.py \
  "        return torch.ops.routertune_vllm.routed_attention(positions, hidden_states, self.op_key)" \
  "        return self.run(positions, hidden_states)" \
  tests/test_serve_vllm.py -k "compiled"
# A mixed step computed for the whole batch: the skipping requests get attention (and KV) they
# must not; the equality and the work-done tests must both see it.
mutate "vLLM mixed step attends every request" src/routertune/serving/vllm_model.py \
  "        if all(keep):" "        if all(keep) or len(keep) > 1:" \
  tests/test_serve_vllm.py -k "not_computed or equals"
