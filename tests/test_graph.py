import networkx as nx
import pytest
import torch
from conftest import Branchy, build_bert, build_cnn, build_gpt2, image_batches, token_batches

from precsearch.search import graph as graph_module
from precsearch import walk
def test_bert_units_include_attention_that_owns_sdpa():
    graph = walk(build_bert(), token_batches(1)[0])
    assert graph.method == "export"
    attention = "encoder.layer.0.attention.self"
    assert graph[attention]["type"] == "BertSelfAttention"
    assert graph[attention]["ops"] == {"scaled_dot_product_attention": 1}
    for projection in ("query", "key", "value"):
        assert graph.graph.has_edge(f"{attention}.{projection}", attention)
    # 3 embedding tables (storage units) + 2 layers x (q, k, v, sdpa, attention out, intermediate,
    # output) + pooler
    assert len(graph) == 18
    embeddings = ["embeddings.word_embeddings", "embeddings.token_type_embeddings", "embeddings.position_embeddings"]
    assert graph.units[:3] == embeddings  # no eligible op: storage units, which run first
    assert [graph[u]["kind"] for u in embeddings] == ["storage"] * 3 and graph[attention]["kind"] == "compute"
    assert graph["embeddings.word_embeddings"]["flops"] == 0 and graph["embeddings.word_embeddings"]["params"] == 512 * 64
    assert graph[f"{attention}.query"]["params"] == 64 * 64 + 64
    assert graph[f"{attention}.query"]["flops"] == 2 * 2 * 16 * 64 * 64
    assert graph[f"{attention}.query"]["input_shapes"] == [[2, 16, 64]]
    assert nx.is_directed_acyclic_graph(graph.graph)


def test_gpt2_units_follow_execution_order():
    graph = walk(build_gpt2(), token_batches(1)[0]["input_ids"])
    assert graph.method == "export"  # the DynamicCache output no longer defeats torch.export
    units = graph.units
    assert units[:5] == ["transformer.wte", "transformer.wpe", "transformer.h.0.attn.c_attn", "transformer.h.0.attn",
                         "transformer.h.0.attn.c_proj"]
    assert units[-1] == "lm_head"
    assert graph.weight_ties == {"lm_head": "transformer.wte"}  # the tied head: one tensor
    assert graph["transformer.h.0.attn"]["ops"] == {"scaled_dot_product_attention": 1}
    assert graph.graph.has_edge("transformer.h.1.mlp.c_proj", "lm_head")


def test_cnn_convs_are_units_batchnorm_is_not():
    graph = walk(build_cnn(), image_batches(1)[0])
    assert graph.units == ["conv1", "conv2", "fc"]
    assert list(graph.graph.edges) == [("conv1", "conv2"), ("conv2", "fc")]
    assert graph["conv1"]["flops"] == 2 * (4 * 16 * 16 * 16) * (3 * 3 * 3)


def test_control_flow_falls_back_to_hooks():
    torch.manual_seed(0)
    model = Branchy().eval()
    graph = walk(model, torch.randn(8, 16))
    assert graph.method == "hooks"
    assert "inp" in graph and "out" in graph
    assert "" in graph  # the root owns the final matmul itself
    assert graph.graph.has_edge("out", "")
    taken = {"pos", "neg"} & set(graph.units)
    assert len(taken) >= 1 and all(graph.graph.has_edge("inp", unit) or graph.graph.in_degree(unit) for unit in taken)


def test_fx_is_used_when_export_fails(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("export unavailable")

    monkeypatch.setattr(graph_module, "_via_export", refuse)
    graph = walk(build_cnn(), image_batches(1)[0])
    assert graph.method == "fx"
    assert graph.units == ["conv1", "conv2", "fc"]
    assert graph["conv1"]["flops"] == 2 * (4 * 16 * 16 * 16) * (3 * 3 * 3)


@pytest.mark.parametrize("build,data", [(build_bert, token_batches), (build_cnn, image_batches)])
def test_all_methods_agree_on_units(monkeypatch, build, data):
    model, batch = build(), data(1)[0]
    exported = walk(model, batch)
    monkeypatch.setattr(graph_module, "_via_export", lambda *a: (_ for _ in ()).throw(RuntimeError()))
    monkeypatch.setattr(graph_module, "_via_fx", lambda *a: (_ for _ in ()).throw(RuntimeError()))
    hooked = walk(model, batch)
    assert hooked.method == "hooks"
    assert hooked.units == exported.units
    assert set(hooked.graph.edges) == set(exported.graph.edges)


def test_cast_boundaries_counts_edges_between_precisions():
    graph = walk(build_cnn(), image_batches(1)[0])
    assert graph.cast_boundaries({}, "bf16") == 0
    assert graph.cast_boundaries({"conv2": "fp32"}, "bf16") == 2


def test_walking_leaves_no_global_hook_behind():
    import torch.nn.modules.module as module_hooks
    from conftest import build_bert, token_batches

    tables = [name for name in dir(module_hooks) if name.startswith("_global_") and name.endswith("hooks")
              or name.endswith("_with_kwargs") or name.endswith("_always_called")]
    before = {name: len(getattr(module_hooks, name)) for name in tables}
    walk(build_bert(), token_batches(1)[0])
    assert {name: len(getattr(module_hooks, name)) for name in tables} == before
