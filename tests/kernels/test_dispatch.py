"""impl="auto": the reference on CPU tensors unless TRITON_INTERPRET is set, Triton otherwise."""
import pytest
import torch

import unirank.kernels.attention.triton as attention_triton
import unirank.kernels.embedding_bag.triton as embedding_bag_triton
from unirank.kernels.attention import prefix_causal_attention
from unirank.kernels.embedding_bag import embedding_bag


def call_attention(impl="auto"):
    q = torch.randn(1, 1, 3, 32)
    return prefix_causal_attention(q, q, q, torch.tensor([3]), torch.tensor([1]), impl=impl)


def call_embedding_bag(impl="auto"):
    return embedding_bag(torch.randn(4, 32), torch.tensor([1, 2]), torch.tensor([0, 2]), impl=impl)


CASES = [(call_attention, attention_triton, "triton_padded_prefix_causal_attention"),
         (call_embedding_bag, embedding_bag_triton, "triton_multi_embedding_bag")]


def forbid(monkeypatch, module, name):
    def fail(*args, **kwargs):
        raise AssertionError("the Triton path was taken")
    monkeypatch.setattr(module, name, fail)


@pytest.mark.parametrize("call,module,name", CASES)
def test_auto_picks_reference_on_cpu_without_interpreter(call, module, name, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    forbid(monkeypatch, module, name)
    assert torch.isfinite(call()).all()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        call(impl="triton")


@pytest.mark.parametrize("call,module,name", CASES)
def test_auto_picks_triton_under_interpreter(call, module, name, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    forbid(monkeypatch, module, name)
    with pytest.raises(AssertionError, match="Triton path"):
        call()


def test_unknown_impl_is_rejected():
    with pytest.raises(ValueError, match="impl"):
        call_attention(impl="cuda")
