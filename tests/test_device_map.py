"""Workers that span devices: the live model split by layer (accelerate), each source on the
device of its parameter, and the in-place merge writing every tensor where its parameter is."""

from __future__ import annotations

import pytest
import torch

from evomerge.device_map import layer_device_map, tensor_devices, worker_devices
from tests.study_factory import make_tiny_study


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("span")
    make_tiny_study(root)
    return root / "models"


def _meta_llama(layers: int = 6):
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    from tests.model_factory import tiny_llama_config

    with init_empty_weights():
        return LlamaForCausalLM(tiny_llama_config(layers=layers, hidden=64, vocab=64))


def test_map_keeps_blocks_whole_in_order_and_balanced():
    model = _meta_llama(6)
    dm = layer_device_map(model, ["cuda:0", "cpu"])  # names only: nothing is moved
    # every module of the model is placed, each block whole, the blocks in order
    blocks = [dm[f"model.layers.{i}"] for i in range(6)]
    assert blocks == ["cuda:0"] * 3 + ["cpu"] * 3  # one cut, equal blocks on each side
    assert dm["model.embed_tokens"] == "cuda:0" and dm["lm_head"] == "cpu"
    names = [n for n, _ in model.named_parameters()]
    where = tensor_devices(names, dm)
    assert set(where) == set(names)
    assert where["model.layers.4.mlp.up_proj.weight"] == torch.device("cpu")
    assert where["model.layers.0.self_attn.q_proj.weight"] == torch.device("cuda:0")


def test_worker_devices():
    assert worker_devices("cuda", 1) == ()
    assert worker_devices("cpu", 4) == ()
    assert worker_devices("cuda", 3) == ("cuda:0", "cuda:1", "cuda:2")


def _spec(models, devices=(), device="cpu"):
    from evomerge.model_set import ModelSet
    from evomerge.scoring.config import ScoringSettings
    from evomerge.worker import WorkerSpec

    paths = {n: str(models / n) for n in ("base", "s1", "s2")}
    return WorkerSpec(
        models=ModelSet(paths=paths, base="base"),
        device=device,
        dtype="float32",
        scoring=ScoringSettings(tasks=("unused",)),
        devices=devices,
    )


def _recipe(models, method):
    from evomerge.recipe import Recipe

    params = {"weight": 0.6, "density": 0.5} if method == "ties" else {"weight": 0.6}
    return Recipe(
        models={n: str(models / n) for n in ("base", "s1", "s2")},
        base_model="base",
        sections=[{"method": method, "models": {"s1": params, "s2": dict(params)}}],
    )


def _merged_state(worker, recipe):
    worker.merger.apply(recipe)
    return {k: v.detach().to("cpu").clone() for k, v in worker.model.state_dict().items()}


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_a_worker_split_by_layer_merges_the_same_tensors(tiny, method):
    """A per-layer map whose devices are all the CPU: the placement path (map, dispatch, each
    source on its parameter's device, merge on the target's device) with nothing to move."""
    from evomerge.worker import Worker

    one = Worker(_spec(tiny))
    split = Worker(_spec(tiny, devices=("cpu", "cpu")))
    recipe = _recipe(tiny, method)
    assert len(split.device_map) > 1 and set(split.device_map.values()) == {"cpu"}
    params = [n for n, _ in split.model.named_parameters()]
    assert set(tensor_devices(params, split.device_map).values()) == {torch.device("cpu")}
    want, got = _merged_state(one, recipe), _merged_state(split, recipe)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        assert torch.equal(one.model(ids).logits, split.model(ids).logits)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_and_cpu_in_one_worker(tiny):
    """A real two-device worker on one GPU: the first blocks on cuda:0, the rest on the CPU."""
    from evomerge.worker import Worker

    one = Worker(_spec(tiny))
    split = Worker(_spec(tiny, devices=("cuda:0", "cpu"), device="cuda"))
    devices = {t.device.type for t in split.merger.targets.values()}
    assert devices == {"cuda", "cpu"}
    for name, t in split.merger.targets.items():  # each resident source beside its parameter
        for (model, src), s in split.sources.tensors.items():
            if src == name:
                assert s.device == t.device, (model, name)
    recipe = _recipe(tiny, "ties")
    want, got = _merged_state(one, recipe), _merged_state(split, recipe)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        torch.testing.assert_close(
            split.model(ids.to("cuda:0")).logits.cpu(), one.model(ids).logits, rtol=1e-4, atol=1e-5
        )
