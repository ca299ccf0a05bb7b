"""transformers' `from_pretrained` keywords: each either gives the logits stock transformers gives with the same
keywords, or is refused before anything loads with one ValueError naming it and what to use instead.

The premise (issue 18): `device_map="auto", max_memory={"cpu": "1MB"}, offload_folder=d` once loaded every weight
onto `meta` through accelerate's disk offload and generated NaN logits without a word.
"""

from __future__ import annotations

import inspect
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import OlmoeForCausalLM, PreTrainedModel

from specmd import AutoOffloadForCausalLM, OffloadOLMoE
from specmd.offload_models import base
from specmd.offload_models.loading import REFUSED, SUPPORTED
from tests.conftest import tiny_model

PROMPT = torch.tensor([[5, 17, 33, 8, 91, 2, 40, 40, 12, 7, 66, 3]])


def load(path: Path | str, **kwargs) -> OffloadOLMoE:  # type: ignore[no-untyped-def]
    return OffloadOLMoE.from_pretrained(path, cache_frac=0.25, progress=False, **kwargs)


def assert_same_as_stock(path: Path | str, **kwargs) -> None:  # type: ignore[no-untyped-def]
    """specmd loaded with `kwargs` gives stock transformers' logits and greedy tokens (eager experts) bit for bit."""
    stock = OlmoeForCausalLM.from_pretrained(path, experts_implementation="eager", **kwargs).eval()
    with load(path, **kwargs) as model, torch.no_grad():
        assert model.dtype == stock.dtype
        assert {p.device for p in model.parameters()} == {torch.device("cpu")}
        assert torch.equal(model(PROMPT).logits, stock(PROMPT).logits)
        greedy = {"max_new_tokens": 6, "do_sample": False}
        assert torch.equal(model.generate(PROMPT, **greedy), stock.generate(PROMPT, **greedy))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"device_map": None},
        {"device_map": "cpu"},
        {"device_map": {"": "cpu"}},
        {"device_map": torch.device("cpu")},
        {"device_map": {"model": "cpu", "lm_head": "cpu"}},
        {"dtype": torch.bfloat16},
        {"torch_dtype": torch.bfloat16},
        {"dtype": "bfloat16"},
        {"dtype": "auto"},
        {"attn_implementation": "eager"},
        {"attn_implementation": "sdpa"},
        {"low_cpu_mem_usage": True},  # transformers 5 ignores these two, and so does specmd
        {"offload_state_dict": True},
        {"disable_mmap": True},
        {"revision": "main", "local_files_only": True, "trust_remote_code": False},
        # what lm_eval's HFLM passes when it does not parallelize
        {"device_map": {"": "cpu"}, "max_memory": None, "quantization_config": None, "gguf_file": None}
        | {"subfolder": ""},
    ],
    ids=repr,
)
def test_supported_keywords_give_stock_logits(checkpoint: Path, kwargs: dict) -> None:
    assert_same_as_stock(checkpoint, **kwargs)


@pytest.fixture
def nothing_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening the checkpoint's weights (which comes before transformers loads any) fails the test."""

    def opened(*args: object, **kwargs: object) -> None:
        raise AssertionError("the checkpoint's weights were opened before the refusal")

    monkeypatch.setattr(base, "ExpertCheckpoint", opened)


INSTEAD = r"limit fast memory with specmd's cache_frac or cache_bytes"
ONE_DEVICE = r"pass device_map=None or 'cpu', one CUDA device \('cuda:0'\), or \{'': device\}"


@pytest.mark.usefixtures("nothing_loads")
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"device_map": "auto"}, rf"device_map='auto' is not supported: .*{ONE_DEVICE}\. {INSTEAD}"),
        ({"device_map": "balanced"}, "device_map='balanced' is not supported"),
        ({"device_map": "balanced_low_0"}, "device_map='balanced_low_0' is not supported"),
        ({"device_map": "sequential"}, "device_map='sequential' is not supported"),
        ({"device_map": {"": "disk"}}, rf"device_map=\{{'': 'disk'\}} offloads weights to disk.*{INSTEAD}"),
        ({"device_map": {"model": "cpu", "lm_head": "disk"}}, "offloads weights to disk, which specmd does not run"),
        ({"device_map": "meta"}, f"device_map='meta' names meta; specmd runs on 'cpu' or a CUDA device: {ONE_DEVICE}"),
        ({"device_map": "mps"}, "device_map='mps' names mps; specmd runs on 'cpu' or a CUDA device"),
        ({"device_map": "gpu0"}, f"device_map='gpu0' names 'gpu0', which is not a device; {ONE_DEVICE}"),
        ({"device_map": {}}, "device_map={} names no device"),
        ({"device_map": -1}, "device_map=-1 names -1, which is not a device"),
        ({"max_memory": {"cpu": "1GB"}}, rf"max_memory=\{{'cpu': '1GB'\}} is not supported: .*{INSTEAD}"),
        ({"offload_folder": "offload"}, f"offload_folder='offload' is not supported: .*{INSTEAD}"),
        ({"offload_buffers": True}, "offload_buffers=True is not supported"),
        ({"quantization_config": {"quant_method": "bitsandbytes"}}, r"quantization_config=.* expert_precisions"),
        ({"gguf_file": "model.gguf"}, "gguf_file='model.gguf' is not supported: .* safetensors"),
        ({"state_dict": {"w": torch.zeros(2)}}, r"state_dict=.* is not supported: .* checkpoint's path"),
        ({"experts_implementation": "grouped_mm"}, "experts_implementation='grouped_mm' is not supported"),
        ({"key_mapping": {"^transformer": "model"}}, "key_mapping=.* is not supported"),
        ({"tp_plan": "auto"}, r"tp_plan='auto' is not supported: .* \(no tensor or pipeline parallelism\)"),
        ({"tp_size": 2}, "tp_size=2 is not supported"),
        ({"use_kernels": True}, "use_kernels=True is not supported"),
        ({"fusion_config": {"patch_embeddings": True}}, "fusion_config=.* is not supported"),
        ({"use_safetensors": False}, "use_safetensors=False is not supported: .* safetensors files"),
    ],
    ids=repr,
)
def test_refused_before_anything_loads(checkpoint: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load(checkpoint, **kwargs)


@pytest.mark.usefixtures("nothing_loads")
def test_the_issue_arguments_are_refused_and_write_nothing(checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "offload"
    kwargs = {"device_map": "auto", "max_memory": {"cpu": "1MB"}, "offload_folder": str(folder)}
    with pytest.raises(ValueError, match=f"device_map='auto' is not supported: .*{INSTEAD}"):
        load(checkpoint, **kwargs)
    with pytest.raises(ValueError, match="device_map='auto' is not supported"):
        AutoOffloadForCausalLM.from_pretrained(checkpoint, cache_frac=0.25, **kwargs)
    assert not folder.exists()


@pytest.mark.usefixtures("nothing_loads")
@pytest.mark.parametrize("device_map", ["cuda", "cuda:0", {"": "cuda:0"}, 0, torch.device("cuda")], ids=repr)
def test_cuda_without_cuda_is_refused(checkpoint: Path, monkeypatch: pytest.MonkeyPatch, device_map: object) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"names cuda(:0)?, but CUDA is not available here .*pass device_map='cpu'"):
        load(checkpoint, device_map=device_map)


@pytest.mark.usefixtures("nothing_loads")
def test_a_missing_or_second_cuda_device_is_refused(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"device_map='cuda:2' names cuda:2, but there are 2 CUDA device\(s\) here"):
        load(checkpoint, device_map="cuda:2")
    split = f"splits the model across cpu, cuda:1, which specmd does not run; {ONE_DEVICE}"
    with pytest.raises(ValueError, match=split):
        load(checkpoint, device_map={"model": 1, "lm_head": "cpu"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("device_map", ["cuda:0", {"": "cuda"}, 0], ids=repr)
def test_one_cuda_device_gives_stock_logits(checkpoint: Path, device_map: object) -> None:
    stock = OlmoeForCausalLM.from_pretrained(checkpoint, experts_implementation="eager", device_map=device_map)
    prompt = PROMPT.cuda()
    with load(checkpoint, device_map=device_map) as model, torch.no_grad():
        assert {p.device.type for p in model.parameters()} == {"cuda"}
        assert torch.equal(model(prompt).logits, stock(prompt).logits)


def test_a_quantized_checkpoint_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    path = tmp_path / "quantized"
    shutil.copytree(checkpoint, path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"this checkpoint is quantized \(bitsandbytes\); .* expert_precisions"):
        load(path)


def test_subfolder_and_variant_of_a_local_checkpoint(tmp_path: Path) -> None:
    """Three different models in one directory: specmd reads its experts from the one transformers loads."""
    tiny_model(seed=1).save_pretrained(tmp_path)
    tiny_model(seed=2).save_pretrained(tmp_path / "sub")
    tiny_model(seed=3).save_pretrained(tmp_path, variant="v2")
    tiny_model(seed=4).save_pretrained(tmp_path / "sub", variant="v2", max_shard_size="20KB")
    for kwargs in ({}, {"subfolder": "sub"}, {"variant": "v2"}, {"subfolder": "sub", "variant": "v2"}):
        assert_same_as_stock(tmp_path, **kwargs)


def test_revision_cache_dir_and_subfolder_of_a_hub_checkpoint(tmp_path: Path) -> None:
    """A hub id served offline from a cache with two revisions, each holding other weights at its root and in a
    subfolder: specmd reads its config and experts from the revision and folder transformers loads."""
    repo = tmp_path / "models--specmd--tiny"
    for seed, ref in enumerate(("main", "v2")):
        commit = f"{seed + 1:040x}"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
        tiny_model(seed=seed + 5).save_pretrained(repo / "snapshots" / commit)
        tiny_model(seed=seed + 7).save_pretrained(repo / "snapshots" / commit / "sub")
    hub = {"cache_dir": str(tmp_path), "local_files_only": True}
    for kwargs in ({}, {"revision": "v2"}, {"revision": "v2", "subfolder": "sub"}):
        assert_same_as_stock("specmd/tiny", **hub, **kwargs)


def test_the_keyword_lists_name_keywords_transformers_reads() -> None:
    """`loading.SUPPORTED` and `REFUSED` (which lm_eval's offload-hf lists as accepted keys) name keywords the
    installed transformers' `from_pretrained` reads: a parameter, a `kwargs.pop`, or an `in kwargs` test."""
    source = inspect.getsource(PreTrainedModel.from_pretrained)
    read = set(inspect.signature(PreTrainedModel.from_pretrained).parameters)
    read |= set(re.findall(r'kwargs\.pop\("(\w+)"', source)) | set(re.findall(r'"(\w+)" in kwargs', source))
    read |= set(re.findall(r"for name in \[([^]]*)\]", source)[0].replace('"', "").replace(" ", "").split(","))
    assert not set(SUPPORTED) - read and not set(REFUSED) - read, (set(SUPPORTED) | set(REFUSED)) - read
