"""Mixed-adapter batches: each row of `model(..., adapter_names=[...])` and of
`generate(..., adapter_names=[...])` equals that row run alone with its adapter."""

from __future__ import annotations

import threading

import pytest
import torch

from shira_export import ShiraConfig, get_shira_model
from shira_export.errors import ShiraInputError
from tiny_models import VOCAB, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_opt

IDS = torch.randint(0, VOCAB, (4, 6), generator=torch.Generator().manual_seed(0))
ROWS = ["a", "b", "__base__", "a"]


def _model(factory):
    torch.manual_seed(0)
    model = get_shira_model(factory(), ShiraConfig(r=2, init_weights=False, random_seed=1), adapter_name="a")
    model.add_adapter("b", ShiraConfig(r=1, init_weights=False, random_seed=2))
    return model.eval()


def _alone(model, ids, name, **kwargs):
    """One row (or rows) with one adapter, or none for __base__, by the ordinary API."""
    with torch.no_grad():
        if name == "__base__":
            with model.disable_adapter():
                return model(input_ids=ids, **kwargs).logits
        model.set_adapter(name)
        return model(input_ids=ids, **kwargs).logits


@pytest.mark.parametrize("factory", [tiny_opt, tiny_llama, tiny_gpt2], ids=["opt", "llama", "gpt2-conv1d"])
def test_each_row_equals_its_adapter_alone(factory):
    model = _model(factory)
    with torch.no_grad():
        mixed = model(input_ids=IDS, adapter_names=ROWS).logits
    for i, name in enumerate(ROWS):
        torch.testing.assert_close(mixed[i], _alone(model, IDS[i : i + 1], name)[0], rtol=0, atol=1e-6)
    assert (mixed[0] - mixed[2]).abs().max() > 1e-4  # the adapters change the rows
    assert (mixed[0] - _alone(model, IDS[0:1], "b")[0]).abs().max() > 1e-4


def test_classification_heads_per_row():
    torch.manual_seed(0)
    model = get_shira_model(
        tiny_bert_cls(), ShiraConfig(r=2, init_weights=False, task_type="SEQ_CLS"), adapter_name="a"
    )
    model.add_adapter("b", ShiraConfig(r=2, init_weights=False, task_type="SEQ_CLS", random_seed=3))
    with torch.no_grad():
        model.model.classifier.modules_to_save["b"].weight.add_(0.5)  # the heads differ
    model.eval()
    with torch.no_grad():
        mixed = model(input_ids=IDS, adapter_names=ROWS).logits
    for i, name in enumerate(ROWS):
        torch.testing.assert_close(mixed[i], _alone(model, IDS[i : i + 1], name)[0], rtol=0, atol=1e-6)


def test_generate_per_row():
    model = _model(tiny_opt)
    ids = IDS[:3]
    names = ROWS[:3]
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, adapter_names=names, **kwargs)
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model.generate(input_ids=ids[i : i + 1], **kwargs)
            else:
                model.set_adapter(name)
                alone = model.generate(input_ids=ids[i : i + 1], **kwargs)
            assert torch.equal(mixed[i], alone[0])
        beams = model.generate(input_ids=ids, adapter_names=names, num_beams=2, **kwargs)
        model.set_adapter("b")
        alone = model.generate(input_ids=ids[1:2], num_beams=2, **kwargs)
    assert torch.equal(beams[1], alone[0])  # rows repeated per beam keep their adapter


def test_refused_like_peft():
    model = _model(tiny_opt)
    with pytest.raises(ShiraInputError, match=r"no adapter \['zz'\]"):
        model(input_ids=IDS, adapter_names=["a", "zz", "a", "a"])
    with pytest.raises(ShiraInputError, match="3 entries but a layer got a batch of 4"):
        model(input_ids=IDS, adapter_names=["a", "b", "a"])
    model.train()
    with pytest.raises(ShiraInputError, match="training mode"):
        model(input_ids=IDS, adapter_names=ROWS)
    model.eval()
    model.merge_adapter()
    with pytest.raises(ShiraInputError, match="merged"):
        model(input_ids=IDS, adapter_names=ROWS)


def test_threads_with_their_own_rows():
    model = _model(tiny_opt)
    orders = [ROWS, list(reversed(ROWS)), ["b"] * 4]
    with torch.no_grad():
        expected = [model(input_ids=IDS, adapter_names=o).logits for o in orders]
    results, errors = {}, []

    def run(k: int) -> None:
        try:
            for _ in range(5):
                with torch.no_grad():
                    out = model(input_ids=IDS, adapter_names=orders[k]).logits
                assert torch.equal(out, expected[k])
            results[k] = True
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(orders))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(results) == [0, 1, 2]
    with torch.no_grad():
        plain = model(input_ids=IDS).logits  # no rows left behind after the threads
    model.set_adapter("a")
    assert torch.equal(plain, _alone(model, IDS, "a"))
