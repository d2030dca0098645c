"""Serving with vLLM: routed vLLM output = routertune's transformers output, on mixed batches.

Tiny random models per served family (Llama, Mistral, Qwen2) are saved as Hugging Face folders;
routertune (transformers, this environment) attaches random routers, saves them and computes the
reference: each request alone, greedy, with its route. vLLM runs in the serving environment
(scripts/install_serve.sh) through tests/vllm_runner.py, all requests of a batch at once, so that
their different routes share prefill and decode steps. Without that environment the vLLM tests
skip, unless ROUTERTUNE_REQUIRE_VLLM=1 (CI sets it) makes that a failure.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from routertune import RouterConfig, attach_routers, save_routers
from routertune.routing.attach import routed_layers, set_thresholds
from routertune.routing.routes import routes_of
from routertune.serving.extra_args import RequestArgumentError, parse_request_routing
from routertune.serving.folder import ServingError, prepare_served_folder

from helpers import byte_chat_tokenizer

ROOT = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).with_name("vllm_runner.py")
SERVED_FAMILIES = ("llama", "mistral", "qwen2")
MAX_TOKENS = 8
LONG_TOKENS = 30
# Decisions closer than this to the threshold could flip between two correct implementations
# (vLLM's and transformers' kernels round differently); the test data keep clear of it.
DECISION_MARGIN = 1e-3


def vllm_python() -> str:
    explicit = os.environ.get("ROUTERTUNE_VLLM_PYTHON")
    candidate = explicit or str(ROOT / ".venv-serve" / "bin" / "python")
    if not Path(candidate).is_file():
        message = f"no serving environment at {candidate} (bash scripts/install_serve.sh)"
        if os.environ.get("ROUTERTUNE_REQUIRE_VLLM") == "1":
            pytest.fail(message + "; ROUTERTUNE_REQUIRE_VLLM=1 requires it")
        pytest.skip(message)
    return candidate


def vllm_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="0-1", OMP_NUM_THREADS="2")
    env.pop("ROUTERTUNE_VLLM_PYTHON", None)
    return env


# ---- tiny models and routers (this environment) -------------------------------------------


def tiny_vllm_model(arch: str, seed: int = 0):
    """A 6-layer random model vLLM's CPU attention accepts (head size 32), vocabulary covering
    the byte-level chat tokenizer."""
    import transformers as T

    common = dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=320,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    cls, config = {
        "llama": (T.LlamaForCausalLM, T.LlamaConfig(**common)),
        "mistral": (T.MistralForCausalLM, T.MistralConfig(sliding_window=None, **common)),
        "qwen2": (T.Qwen2ForCausalLM, T.Qwen2Config(**common)),
    }[arch]
    torch.manual_seed(seed)
    model = cls(config).eval()
    model.generation_config.eos_token_id = None  # vLLM runs with ignore_eos: both go MAX_TOKENS
    return model


def random_routers(model, seed: int, scale: float = 2.0) -> None:
    attach_routers(model, RouterConfig(granularity="attn_sequence", router_layers=4))
    g = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size
    for layer in routed_layers(model).values():
        with torch.no_grad():
            layer.router.proj.weight.copy_(torch.randn(1, hidden, generator=g) * scale / hidden**0.5)


def prompts(seed: int, n: int = 6) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 320, (int(5 + 2 * i),), generator=g).tolist() for i in range(n)]


def reference(model, prompt: list[int], threshold: float | None, max_tokens: int = MAX_TOKENS) -> dict:
    """routertune's transformers greedy output for one request alone, with its route and the
    smallest distance of its router scores to the threshold."""
    layers = routed_layers(model)
    saved = {i: layer.router.threshold for i, layer in layers.items()}
    if threshold is not None:
        set_thresholds(model, threshold)
    margins = []
    hooks = [
        layer.router.register_forward_hook(
            lambda mod, args, out: margins.append(float((out - mod.threshold).abs().min()))
        )
        for layer in layers.values()
    ]
    try:
        ids = torch.tensor([prompt])
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            return_dict_in_generate=True,
        )
    finally:
        for h in hooks:
            h.remove()
        set_thresholds(model, saved)
    store = routes_of(out.past_key_values, create=False)
    fixed = threshold is not None and threshold <= 0
    return {
        "tokens": out.sequences[0, len(prompt) :].tolist(),
        "skipped": sorted(i for i, r in store.items() if not bool(r.keep[0])),
        "margin": float("inf") if fixed else min(margins),
    }


def build_family(arch: str, root: Path) -> dict:
    model = tiny_vllm_model(arch)
    plain_dir, served_dir, routers_dir = (
        root / f"{arch}-plain",
        root / f"{arch}-served",
        root / f"{arch}-routers",
    )
    model.save_pretrained(plain_dir)
    byte_chat_tokenizer().save_pretrained(plain_dir)
    random_routers(model, seed=1)
    save_routers(model, routers_dir)
    prepare_served_folder(plain_dir, routers_dir, served_dir)
    ps = prompts(seed=2)
    # Four requests on the router files' thresholds, one dense, one with a lower threshold.
    controls = [None, None, None, None, {"routertune_dense": True}, {"routertune_threshold": 0.3}]
    thresholds = [None, None, None, None, 0.0, 0.3]
    mixed = [
        {"prompt": p, "max_tokens": MAX_TOKENS, **({"extra_args": c} if c else {})}
        for p, c in zip(ps, controls, strict=True)
    ]
    refs = [reference(model, p, t) for p, t in zip(ps, thresholds, strict=True)]
    # Longer requests for a KV cache too small to hold them all: vLLM preempts and recomputes.
    long_prompts = [
        torch.randint(3, 320, (20 + i,), generator=torch.Generator().manual_seed(3 + i)).tolist()
        for i in range(6)
    ]
    long = [{"prompt": p, "max_tokens": LONG_TOKENS} for p in long_prompts]
    long_refs = [reference(model, p, None, LONG_TOKENS) for p in long_prompts]
    return {
        "long": long,
        "long_refs": long_refs,
        "model": model,
        "plain_dir": plain_dir,
        "served_dir": served_dir,
        "routers_dir": routers_dir,
        "mixed": mixed,
        "refs": refs,
        "routed": sorted(routed_layers(model)),
    }


# ---- checks without vLLM --------------------------------------------------------------------


def test_served_folder_names_the_routed_architecture_and_links_the_model(tmp_path):
    fam = build_family("llama", tmp_path)
    config = json.loads((fam["served_dir"] / "config.json").read_text())
    assert config["architectures"] == ["RoutertuneLlamaForCausalLM"]
    assert config["routertune"]["routers"] == "routertune"
    assert (fam["served_dir"] / "model.safetensors").resolve() == (
        fam["plain_dir"] / "model.safetensors"
    ).resolve()
    for name in ("router_config.json", "routers.safetensors"):
        assert (fam["served_dir"] / "routertune" / name).read_bytes() == (
            fam["routers_dir"] / name
        ).read_bytes()
    with pytest.raises(ServingError, match="already a served folder"):
        prepare_served_folder(fam["served_dir"], fam["routers_dir"], tmp_path / "again")


def test_served_folder_refuses_bad_input_before_writing(tmp_path):
    fam = build_family("llama", tmp_path)
    out = tmp_path / "out"
    # routers of another model shape
    other_dir = tmp_path / "other-routers"
    other_dir.mkdir()
    meta = json.loads((fam["routers_dir"] / "router_config.json").read_text())
    (other_dir / "router_config.json").write_text(json.dumps({**meta, "hidden_size": 64}))
    (other_dir / "routers.safetensors").write_bytes((fam["routers_dir"] / "routers.safetensors").read_bytes())
    with pytest.raises(ServingError, match="hidden_size=64"):
        prepare_served_folder(fam["plain_dir"], other_dir, out)
    # a granularity vLLM serving does not support
    token_dir = tmp_path / "token-routers"
    token_dir.mkdir()
    (token_dir / "router_config.json").write_text(
        json.dumps({**meta, "router_config": {**meta["router_config"], "granularity": "attn_token"}})
    )
    (token_dir / "routers.safetensors").write_bytes((fam["routers_dir"] / "routers.safetensors").read_bytes())
    with pytest.raises(ServingError, match="granularity 'attn_token'.*supports attn_sequence"):
        prepare_served_folder(fam["plain_dir"], token_dir, out)
    # an unsupported family
    neox_dir = tmp_path / "neox"
    neox_dir.mkdir()
    config = json.loads((fam["plain_dir"] / "config.json").read_text())
    (neox_dir / "config.json").write_text(json.dumps({**config, "architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(
        ServingError, match="serves LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM.*GPTNeoX"
    ):
        prepare_served_folder(neox_dir, fam["routers_dir"], out)
    # corrupt weights, missing files
    bad_dir = tmp_path / "bad-routers"
    bad_dir.mkdir()
    (bad_dir / "router_config.json").write_text(json.dumps(meta))
    (bad_dir / "routers.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ServingError, match="corrupt or unreadable"):
        prepare_served_folder(fam["plain_dir"], bad_dir, out)
    with pytest.raises(ServingError, match="router_config.json is missing"):
        prepare_served_folder(fam["plain_dir"], other_dir.with_name("nowhere"), out)
    # routers trained with a LoRA adapter (serving would drop it)
    lora_dir = tmp_path / "lora-routers"
    lora_dir.mkdir()
    for name in ("router_config.json", "routers.safetensors"):
        (lora_dir / name).write_bytes((fam["routers_dir"] / name).read_bytes())
    (lora_dir / "adapter_config.json").write_text("{}")
    with pytest.raises(ServingError, match="holds a LoRA adapter trained with its routers"):
        prepare_served_folder(fam["plain_dir"], lora_dir, out)
    assert not out.exists()


def test_request_arguments_are_checked():
    assert parse_request_routing(None).dense is False
    assert parse_request_routing({"routertune_dense": 1, "other": "x"}).dense is True
    assert parse_request_routing({"routertune_threshold": "0.7"}).threshold == 0.7
    for bad, match in (
        ({"routertune_dense": "maybe"}, "must be true or false"),
        ({"routertune_threshold": "abc"}, "must be a number"),
        ({"routertune_threshold": -1}, ">= 0"),
        ({"routertune_capacity": 0.5}, "unknown routertune argument"),
    ):
        with pytest.raises(RequestArgumentError, match=match):
            parse_request_routing(bad)


def test_other_vllm_releases_are_refused_by_name():
    from routertune.serving.plugin import check_vllm_version

    check_vllm_version("0.32.0")
    with pytest.raises(RuntimeError, match=r"supports vLLM 0\.32\.x; this environment has vLLM 0\.33\.1"):
        check_vllm_version("0.33.1")


def test_serve_cli_refuses_bad_input_before_starting(tmp_path):
    fam = build_family("llama", tmp_path)
    cli = [sys.executable, "-m", "routertune", "serve", "--model", str(fam["plain_dir"])]
    refused = subprocess.run(
        [*cli, "--routers", str(fam["routers_dir"]), "--enable-prefix-caching"],
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0 and "--enable-prefix-caching" in refused.stderr
    missing = subprocess.run([*cli, "--routers", str(tmp_path / "nope")], capture_output=True, text=True)
    assert missing.returncode != 0 and "router_config.json is missing" in missing.stderr
    env = {**os.environ, "ROUTERTUNE_VLLM_PYTHON": sys.executable}  # this environment has no vLLM
    no_vllm = subprocess.run(
        [*cli, "--routers", str(fam["routers_dir"]), "--served_dir", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert no_vllm.returncode != 0 and "cannot import vLLM" in no_vllm.stderr
    printed = subprocess.run(
        [
            *cli,
            "--routers",
            str(fam["routers_dir"]),
            "--served_dir",
            str(tmp_path / "s"),
            "--print_command",
            "--port",
            "9",
        ],
        capture_output=True,
        text=True,
    )
    assert printed.returncode == 0, printed.stderr
    assert "--worker-cls routertune.serving.vllm_worker.RoutedWorker" in printed.stdout
    assert printed.stdout.strip().endswith("--port 9")


# ---- vLLM (serving environment) ------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_results(tmp_path_factory):
    python = vllm_python()
    root = tmp_path_factory.mktemp("vllm")
    families = {arch: build_family(arch, root) for arch in SERVED_FAMILIES}
    for arch, fam in families.items():
        tight = min(r["margin"] for r in fam["refs"] + (fam["long_refs"] if arch == "llama" else []))
        assert tight > DECISION_MARGIN, (
            f"{arch}: a router score lies {tight:.2e} from its threshold (test data)"
        )
    llama = families["llama"]
    dense_requests = [{**r, "extra_args": {"routertune_dense": True}} for r in llama["mixed"]]
    engines = [
        {"model": str(f["served_dir"]), "batches": {"mixed": f["mixed"]}}
        for a, f in families.items()
        if a != "llama"
    ]
    # One llama engine for the mixed batch, two of its requests alone, and all of them dense.
    llama_batches = {"mixed": llama["mixed"], "alone0": [llama["mixed"][0]], "alone3": [llama["mixed"][3]]}
    engines.append({"model": str(llama["served_dir"]), "batches": {**llama_batches, "dense": dense_requests}})
    engines.append({"model": str(llama["plain_dir"]), "routed": False, "batches": {"plain": llama["mixed"]}})
    engines.append({"model": str(llama["served_dir"]), "compile": True, "batches": {"mixed": llama["mixed"]}})
    # 6 requests of up to 25 + 30 tokens need 12 blocks of 32 at the end; 8 usable (vLLM keeps one).
    small_cache = {"block_size": 32, "num_gpu_blocks_override": 9}
    engines.append(
        {"model": str(llama["served_dir"]), "engine_args": small_cache, "batches": {"long": llama["long"]}}
    )
    spec, result = root / "spec.json", root / "result.json"
    spec.write_text(json.dumps({"engines": engines}))
    run = subprocess.run(
        [python, str(RUNNER), str(spec), str(result)],
        capture_output=True,
        text=True,
        env=vllm_env(),
        timeout=900,
    )
    (root / "runner.log").write_text(run.stderr)
    assert run.returncode == 0, run.stderr[-6000:]
    out = json.loads(result.read_text())
    names = [a for a in SERVED_FAMILIES if a != "llama"] + ["llama", "plain", "compiled", "preempted"]
    return families, dict(zip(names, out, strict=True)), dict(zip(names, engines, strict=True))


def _check_against_reference(fam: dict, batch: dict, requests: list[int]) -> None:
    for got_tokens, got_route, r in zip(batch["tokens"], batch["routes"], requests, strict=True):
        ref = fam["refs"][r]
        assert got_tokens == ref["tokens"], f"request {r}"
        assert got_route["skipped_layers"] == ref["skipped"], f"request {r}"
        assert got_route["routed_layers"] == fam["routed"]


@pytest.mark.integration
@pytest.mark.parametrize("arch", SERVED_FAMILIES)
def test_vllm_routed_mixed_batch_equals_transformers(vllm_results, arch):
    families, results, _ = vllm_results
    fam = families[arch]
    _check_against_reference(fam, results[arch]["batches"]["mixed"], list(range(len(fam["mixed"]))))
    # The batch really mixes routes: some layer kept by one request and skipped by another.
    skipped = [set(ref["skipped"]) for ref in fam["refs"]]
    assert any(any(i in s for s in skipped) and any(i not in s for s in skipped) for i in fam["routed"])
    assert fam["refs"][4]["skipped"] == []  # the dense request


@pytest.mark.integration
@pytest.mark.parametrize("engine", [*SERVED_FAMILIES, "compiled"])
def test_vllm_skipped_attention_is_not_computed(vllm_results, engine):
    """Each routed layer attended (and wrote KV for) exactly the tokens of the requests that keep
    it: prompt plus all generated tokens but the last, over every batch the engine ran; under
    vLLM's compilation too."""
    families, results, engines = vllm_results
    result = results[engine]
    batches = engines[engine]["batches"]
    expected = dict.fromkeys(families["llama" if engine == "compiled" else engine]["routed"], 0)
    for name, requests in batches.items():
        for req, route in zip(requests, result["batches"][name]["routes"], strict=True):
            for i in expected:
                if i not in route["skipped_layers"]:
                    expected[i] += len(req["prompt"]) + req["max_tokens"] - 1
    assert {int(k): v for k, v in result["tokens_attended"].items()} == expected
    assert min(expected.values()) < max(expected.values())  # some layer skipped some request


@pytest.mark.integration
def test_vllm_route_does_not_depend_on_the_batch(vllm_results):
    families, results, _ = vllm_results
    for r in (0, 3):
        _check_against_reference(families["llama"], results["llama"]["batches"][f"alone{r}"], [r])


@pytest.mark.integration
def test_vllm_routers_all_on_equal_plain_vllm(vllm_results):
    families, results, _ = vllm_results
    plain = results["plain"]["batches"]["plain"]["tokens"]
    dense = results["llama"]["batches"]["dense"]
    assert dense["tokens"] == plain
    assert all(route["skipped_layers"] == [] for route in dense["routes"])
    model = families["llama"]["model"]
    assert plain == [reference(model, req["prompt"], 0.0)["tokens"] for req in families["llama"]["mixed"]]


@pytest.mark.integration
def test_vllm_compiled_routed_equals_eager(vllm_results):
    """vLLM's default compilation traces the model once; the route must still be per request."""
    families, results, _ = vllm_results
    fam = families["llama"]
    _check_against_reference(fam, results["compiled"]["batches"]["mixed"], list(range(len(fam["mixed"]))))


@pytest.mark.integration
def test_vllm_preempted_requests_keep_their_route(vllm_results):
    """A KV cache too small for the batch: vLLM preempts requests and prefills them again later
    (prompt + the tokens generated so far). The held route makes the output the same as alone."""
    families, results, engines = vllm_results
    fam = families["llama"]
    got = results["preempted"]["batches"]["long"]
    for r, (tokens, route) in enumerate(zip(got["tokens"], got["routes"], strict=True)):
        assert tokens == fam["long_refs"][r]["tokens"], f"request {r}"
        assert route["skipped_layers"] == fam["long_refs"][r]["skipped"], f"request {r}"
    without_preemption = {
        i: sum(
            len(q["prompt"]) + LONG_TOKENS - 1
            for q, ref in zip(fam["long"], fam["long_refs"], strict=True)
            if i not in ref["skipped"]
        )
        for i in fam["routed"]
    }
    attended = {int(k): v for k, v in results["preempted"]["tokens_attended"].items()}
    # Recomputation after preemption attends more tokens than one pass would: it happened.
    assert sum(attended.values()) > sum(without_preemption.values())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.integration
def test_routertune_serve_answers_openai_chat_on_loopback(tmp_path):
    python = vllm_python()
    fam = build_family("llama", tmp_path)
    port = _free_port()
    env = {**vllm_env(), "ROUTERTUNE_VLLM_PYTHON": python}
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "routertune", "serve", "--model", str(fam["plain_dir"]), "--routers", str(fam["routers_dir"]),
         "--served_dir", str(tmp_path / "served"), "--host", "127.0.0.1", "--port", str(port),
         "--enforce-eager", "--max-model-len", "256", "--dtype", "float32"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
            try:
                with urllib.request.urlopen(base + "/health", timeout=2):
                    break
            except OSError:
                assert time.time() < deadline, "server did not start in 300 s"
                time.sleep(2)
        chat = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "What is 2+3?"}],
            "max_tokens": 6,
            "temperature": 0,
        }
        status, body = _post(base + "/v1/chat/completions", {**chat, "model": fam["plain_dir"].name})
        assert status == 200, body
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert body["routertune"]["routed_layers"] == fam["routed"]
        status, dense = _post(
            base + "/v1/chat/completions",
            {**chat, "model": fam["plain_dir"].name, "vllm_xargs": {"routertune_dense": 1}},
        )
        assert status == 200 and dense["routertune"]["skipped_layers"] == []
        status, bad = _post(
            base + "/v1/chat/completions",
            {**chat, "model": fam["plain_dir"].name, "vllm_xargs": {"routertune_threshold": "abc"}},
        )
        assert status == 400 and "routertune_threshold must be a number" in bad["error"]["message"]
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    assert server.returncode is not None
