import pytest
import torch

from graphopt.errors import UserError
from graphopt.train.models import GPTConfig, LlamaConfig, build_model, config_from_dict

SMALL = dict(vocab_size=97, max_seq_len=24, dim=32, num_layers=2, num_heads=4, mlp_hidden=48)


@pytest.fixture(params=["gpt", "llama"])
def model(request):
    torch.manual_seed(0)
    cfg = GPTConfig(**SMALL) if request.param == "gpt" else LlamaConfig(num_kv_heads=2, **SMALL)
    return build_model(cfg).eval()


def test_cached_forward_matches_full_forward(model):
    idx = torch.randint(0, 97, (2, 20))
    full = model(idx)
    pieces, cache = [], None
    for chunk in (idx[:, :7], idx[:, 7:8], idx[:, 8:15], idx[:, 15:]):
        logits, cache = model.forward_cached(chunk, cache)
        pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache[0][0].shape[2] == 20


def test_forward_is_causal(model):
    idx = torch.randint(0, 97, (1, 16))
    changed = idx.clone()
    changed[0, 10] = (changed[0, 10] + 1) % 97
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_llama_kv_cache_holds_fewer_heads_than_queries():
    model = build_model(LlamaConfig(num_kv_heads=2, **SMALL)).eval()
    _, cache = model.forward_cached(torch.randint(0, 97, (1, 5)), None)
    k_cache_BNSD = cache[0][0]
    assert k_cache_BNSD.shape == (1, 2, 5, 8)


def test_gradient_checkpointing_gives_the_same_gradients(model):
    idx = torch.randint(0, 97, (2, 12))
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.train()
        model.gradient_checkpointing = flag
        model(idx).logsumexp(-1).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_tied_embeddings_share_one_tensor():
    model = build_model(LlamaConfig(num_kv_heads=2, **SMALL))
    assert model.lm_head.weight is model.tok_emb.weight


@pytest.mark.parametrize("bad, message", [
    (dict(dim=30), "num_heads=4 does not divide dim=30"),
    (dict(num_kv_heads=3), "num_kv_heads=3 must divide num_heads=4"),
    (dict(num_layers=0), "num_layers=0 must be a positive integer"),
    (dict(arch="rnn"), "unknown arch 'rnn'"),
    (dict(colour="red"), "unknown field(s) colour"),
])
def test_impossible_configs_are_user_errors(bad, message):
    d = dict(SMALL, arch="llama", num_kv_heads=2)
    d.update(bad)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_dict(d)


def test_forward_exports_with_dynamic_batch_and_seq(model):
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=24)
    program = torch.export.export(model, (torch.randint(0, 97, (2, 10)),),
                                  dynamic_shapes=({0: batch, 1: seq},))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "aten.scaled_dot_product_attention.default" in targets
    other = torch.randint(0, 97, (3, 17))
    torch.testing.assert_close(program.module()(other), model(other))
