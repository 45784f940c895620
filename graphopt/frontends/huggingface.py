"""Hugging Face models: a `save_pretrained` folder, or a state-dict file next to a
`config.json`, loaded offline through `transformers` and exported to the IR.

Causal LMs export `(input_ids, attention_mask) -> logits`, every other model its
`last_hidden_state`, with `batch` and `seq` dynamic and no KV cache. Encoders with segment
embeddings (BERT's `type_vocab_size` > 1) take `token_type_ids` too, so a tokenizer's whole
output (sentence pairs included) is fed as it is. Nothing is downloaded
(`local_files_only`, `HF_HUB_OFFLINE=1`), no code from the folder runs (`trust_remote_code`
is off), and weights come from safetensors or `torch.load(weights_only=True)`.

Attention is exported with transformers' "eager" implementation. Its dynamo export is exact
for padded batches; the default "sdpa" exports too, but PyTorch's SDPA kernel returns zeros
for a query row that every key masks out (a left-padded position of a causal LM), which the
exported graph does not reproduce. Real (unpadded) positions agree either way.

Mixture-of-experts blocks (Mixtral, Qwen-MoE, OLMoE and the other models whose experts use
transformers' `use_experts_implementation`; their own forward does not trace: it counts tokens
per expert with `histc` and loops over the experts hit) export after their router as one
graphopt.MoE node where the experts are SwiGLU ones (gate and up stacked, no biases), which ORT
runs sparse; other experts export dense: every expert on every token, its output weighted by
the router's weight for that token (zero where the router did not choose it), the same sum at
the compute of all experts. DBRX's experts (its own module: w1, v1, w2 stacked along their
rows, a loop over the experts hit) take the same path (`_traceable_dbrx_experts`).
"""
from __future__ import annotations

import contextlib
import json
import os
import types
from pathlib import Path

from graphopt import progress as notes
from graphopt.errors import UserError

# transformers' weight file names in a save_pretrained folder.
SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
PYTORCH_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")

# Example sizes for tracing; any size >= 2 works, the exported dims are symbolic.
EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 8


def is_hf_config(config: dict) -> bool:
    return "model_type" in config or "architectures" in config


def load_hf_folder(folder: Path, config: dict, *, progress: bool = True):
    """A `save_pretrained` folder -> Graph."""
    model, output = load_hf_module(folder, config)
    return export_hf_module(model, output, label=f"{folder.name or folder} ({_class_name(model)})",
                            source=str(folder), progress=progress)


def load_hf_state_dict_file(path: Path, config: dict, state_dict: dict, *, progress: bool = True):
    """A state-dict file next to a Hugging Face `config.json` -> Graph."""
    model, output = load_hf_module(path.parent, config, state_dict=state_dict, weights_name=str(path))
    return export_hf_module(model, output, label=f"{path.name} ({_class_name(model)})",
                            source=str(path), progress=progress)


def load_hf_module(folder: Path, config: dict, *, state_dict: dict | None = None,
                   weights_name: str | None = None):
    """The eval-mode `transformers` model for `folder`'s config.json and what to export from
    it (`"logits"` or `"last_hidden_state"`). Weights come from `state_dict` when given, else
    from the folder's safetensors (or `.bin`, read with weights_only=True)."""
    import torch
    from safetensors import SafetensorError

    with _offline_and_quiet():
        cfg = _auto_config(folder, config)
        cls, output = _model_class(folder, config, cfg)
        if state_dict is None:
            state_dict, weights_name = _folder_weights(folder)
        source = weights_name or str(folder)
        kwargs = dict(config=cfg, output_loading_info=True, attn_implementation="eager", dtype=torch.float32)
        try:
            if state_dict is None:  # safetensors in the folder: let transformers read (and shard) them
                model, info = cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                                  weights_only=True, **kwargs)
            else:
                model, info = cls.from_pretrained(None, state_dict=state_dict, **kwargs)
        except (OSError, RuntimeError, ValueError, KeyError, SafetensorError) as e:
            # transformers names a weight of the wrong shape only in a logged table
            wrong = _wrong_shape(cls, cfg, folder, state_dict) if "ignore_mismatched_sizes" in str(e) else None
            why = wrong or f"cannot load {cls.__name__} weights ({_first_line(e)})"
            raise UserError(f"{source}: {why}") from None
    missing = sorted(info.get("missing_keys") or ())
    if output == "last_hidden_state":  # a checkpoint saved without a pooler: not part of the export
        missing = [k for k in missing if not k.startswith("pooler.")]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(f"{source}: missing weight(s) {', '.join(missing[:3])}{more} for {cls.__name__}")
    mismatched = info.get("mismatched_keys") or ()
    if mismatched:
        first = sorted(mismatched)[0]
        raise UserError(f"{source}: weight {first[0] if isinstance(first, tuple) else first} has the wrong shape "
                        f"for {cls.__name__} (config.json disagrees with the weights)")
    # Weights the model has no place for are dropped by transformers with a log line. Layers
    # past the config's count (a 3-layer checkpoint beside a 2-layer config.json) would export as
    # a silently different model: refused. Anything else (a task head when the base model is
    # exported, buffers older checkpoints saved, a value head) is said and left out.
    unexpected = sorted(k for k in info.get("unexpected_keys") or () if not k.endswith(_SAVED_BUFFERS))
    extra_layers = _extra_layers(unexpected, set(model.state_dict()))
    if extra_layers:
        more = f" and {len(extra_layers) - 3} more" if len(extra_layers) > 3 else ""
        raise UserError(f"{source}: weight(s) {', '.join(extra_layers[:3])}{more} are of layers {cls.__name__} "
                        "does not have as config.json describes it (config.json disagrees with the weights)")
    if unexpected:
        more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
        notes.note(f"note: {source}: weight(s) {', '.join(unexpected[:3])}{more} are not part of {cls.__name__}; "
                   "left out of the export")
    return model.eval(), output


def _extra_layers(unexpected: list[str], known: set[str]) -> list[str]:
    """The unexpected keys that are another copy of a layer the model has ("h.2.attn.w" where
    "h.0.attn.w" is the model's): the checkpoint has more layers (or experts) than the config."""
    out = []
    for k in unexpected:
        parts = k.split(".")
        if any(p.isdigit() and ".".join(parts[:i] + ["0"] + parts[i + 1:]) in known for i, p in enumerate(parts)):
            out.append(k)
    return out


def _wrong_shape(cls, cfg, folder: Path, state_dict: dict | None) -> str | None:
    """"weight W has the wrong shape ..." for the first weight whose shape in the checkpoint
    differs from the model's config.json describes (the model built on the meta device), or None."""
    import torch

    try:
        with torch.device("meta"):
            want = {k: tuple(v.shape) for k, v in cls(cfg).state_dict().items()}
        if state_dict is not None:
            have = {k: tuple(v.shape) for k, v in state_dict.items()}
        else:
            from safetensors import safe_open

            have = {}
            for path in sorted(folder.glob("*.safetensors")):
                with safe_open(str(path), framework="pt") as f:
                    have.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    except Exception:  # only the message is at stake: transformers' own is kept
        return None
    wrong = sorted(k for k in have.keys() & want.keys() if have[k] != want[k])
    if not wrong:
        return None
    k = wrong[0]
    return (f"weight {k} has the wrong shape for {cls.__name__}: {have[k]} in the weights, {want[k]} in the model "
            f"config.json describes{f' (and {len(wrong) - 1} more)' if len(wrong) > 1 else ''}")


# buffers that older checkpoints saved and current models recompute (GPT-2's attention mask,
# rotary frequencies, position ids): not weights
_SAVED_BUFFERS = ("masked_bias", ".attn.bias", ".attention.bias", "inv_freq", "position_ids", "_float_tensor")


def takes_token_type_ids(model, output: str) -> bool:
    """An encoder whose forward takes `token_type_ids` and that has more than one segment
    embedding: its tokenizer emits them, and a sentence pair needs them."""
    import inspect

    if output == "logits" or getattr(model.config, "type_vocab_size", 0) < 2:
        return False
    return "token_type_ids" in inspect.signature(model.forward).parameters


def export_hf_module(model, output: str, *, label: str, source: str, progress: bool = True):
    """Wrap and export: `(input_ids, attention_mask[, token_type_ids]) -> logits | last_hidden_state`."""
    import torch

    from graphopt.frontends.torch_export import export_module

    cfg = model.config
    max_seq = _max_positions(cfg)
    seq = min(EXAMPLE_SEQ, max_seq) if max_seq else EXAMPLE_SEQ
    vocab = int(getattr(cfg, "vocab_size", 0) or 2)
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (EXAMPLE_BATCH, seq), generator=gen)
    attention_mask = torch.ones(EXAMPLE_BATCH, seq, dtype=torch.int64)
    attention_mask[0, : seq // 3] = 0  # left padding, so the mask is a real input of the trace
    batch_dim = torch.export.Dim("batch", min=1)
    seq_dim = torch.export.Dim("seq", min=1, max=max_seq) if max_seq else torch.export.Dim("seq", min=1)
    dims = {0: batch_dim, 1: seq_dim}
    args, names = [input_ids, attention_mask], ["input_ids", "attention_mask"]
    if takes_token_type_ids(model, output):
        token_type_ids = torch.zeros(EXAMPLE_BATCH, seq, dtype=torch.int64)
        token_type_ids[:, seq // 2:] = 1  # a sentence pair, so the input is a real one in the trace
        args.append(token_type_ids)
        names.append("token_type_ids")
    wrapper = _wrapper_class()(model, output)
    with _traceable_experts(model), _traceable_dbrx_experts(model), _real_rotary(model):
        graph = export_module(wrapper, tuple(args), {}, names, [output], {n: dims for n in names},
                              label=label, progress=progress, source=source)
    record_config_hints(graph, cfg)
    return graph


def record_config_hints(graph: Graph, cfg) -> None:
    """What the KV-cache rewrite reads from a Hugging Face config (an object or its dict),
    where the graph does not say it already: the maximum context (the position tables are
    built this long) and the sliding window or attention chunk (a hint: the masks are probed
    past it)."""
    if isinstance(cfg, dict):
        cfg = types.SimpleNamespace(**cfg)
    props = graph.metadata.metadata_props
    max_seq = _max_positions(cfg)
    if max_seq:
        props.setdefault("graphopt.max_positions", str(max_seq))
        rows = getattr(cfg, "max_position_embeddings", None)
        if getattr(cfg, "model_type", None) in _PADDING_OFFSET_POSITIONS and isinstance(rows, int) and rows > max_seq:
            props.setdefault(POSITION_TABLE_ROWS, str(rows))  # the table the positions index, past the offset
    # a chunked attention's chunk (Llama 4) is a window for the probe too: past it the masks are
    # not causal, which the rewrite refuses, and a chunk wider than it probes caps the context
    # at the chunk, within which the attention is causal
    windows = [w for w in (getattr(cfg, "sliding_window", None), getattr(cfg, "attention_chunk_size", None))
               if isinstance(w, int) and w > 0]
    if windows:
        props.setdefault("graphopt.sliding_window", str(min(windows)))


def onnx_config_hints(graph: Graph, onnx_path: Path) -> None:
    """The hints of the Hugging Face config.json beside an exported .onnx file (an Optimum
    export folder), if there is one."""
    config_path = onnx_path.parent / "config.json"
    try:
        config = json.loads(config_path.read_text()) if config_path.is_file() else None
    except (OSError, UnicodeDecodeError, ValueError):
        return  # not a config this can read: the rewrite asks for max-positions if it needs it
    if isinstance(config, dict) and is_hf_config(config):
        record_config_hints(graph, config)


# --------------------------------------------------------------------------------------
# Config and class


def _auto_config(folder: Path, config: dict):
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    named = archs[0] if archs else model_type
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        hint = " (it needs the folder's own code, which graphopt does not run)" if "auto_map" in config else ""
        raise UserError(f"{folder}: unknown architecture {named!r} (model_type {model_type!r}): "
                        f"transformers {transformers.__version__} has no such model{hint}")
    for arch in archs:
        if not isinstance(arch, str) or not hasattr(transformers, arch):
            raise UserError(f"{folder}: unknown architecture {arch!r} (model_type {model_type!r}): "
                            f"transformers {transformers.__version__} has no such model class")
    from huggingface_hub.errors import StrictDataclassError

    try:
        return transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, StrictDataclassError) as e:  # (a field of the wrong type)
        raise UserError(f"{folder}/config.json: not a usable {model_type} config ({_first_line(e)})") from None


def _model_class(folder: Path, config: dict, cfg):
    """Causal LMs (by their saved architecture, or by family when none is saved) export
    logits; everything else loads as the base model and exports its last hidden state."""
    import transformers

    if getattr(cfg, "is_encoder_decoder", False):
        raise UserError(f"{folder}: {cfg.model_type} is an encoder-decoder model; graphopt's Hugging Face "
                        "frontend takes decoder-only and encoder-only models")
    causal = transformers.AutoModelForCausalLM._model_mapping
    base = transformers.AutoModel._model_mapping
    masked = transformers.AutoModelForMaskedLM._model_mapping
    archs = config.get("architectures") or []
    kind = type(cfg)
    if archs:
        wants_lm = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    else:  # a bare config: families with a masked-LM head (BERT, RoBERTa, ...) are encoders
        wants_lm = kind not in masked
    if wants_lm and kind in causal:
        return causal[kind], "logits"
    if kind in base:
        heads = [a for a in archs if a != base[kind].__name__]
        if heads:  # a task head the checkpoint carries (a classifier, a masked-LM head) is not in the export
            notes.note(f"note: {folder} is a {heads[0]}; graphopt exports its encoder ({base[kind].__name__}: "
                          "last_hidden_state), not the head's outputs")
        return base[kind], "last_hidden_state"
    raise UserError(f"{folder}: transformers has no base model or causal LM for {cfg.model_type!r}")


def _folder_weights(folder: Path):
    """(None, None) when the folder has safetensors (transformers reads them); else the state
    dict read from its `.bin` file(s) with weights_only=True."""
    from graphopt.frontends.weights import load_state_dict

    if any((folder / f).is_file() for f in SAFETENSORS_FILES):
        return None, None
    if (folder / PYTORCH_FILES[0]).is_file():
        path = folder / PYTORCH_FILES[0]
        return load_state_dict(path), str(path)
    index = folder / PYTORCH_FILES[1]
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{index}: not a readable weight index ({_first_line(e)})") from None
        state: dict = {}
        for shard in shards:
            shard_path = (folder / shard).resolve()
            if folder.resolve() not in shard_path.parents:
                raise UserError(f"{index}: shard {shard!r} points outside the folder")
            state.update(load_state_dict(shard_path))
        return state, str(index)
    raise UserError(f"{folder}: no weights: expected model.safetensors (or pytorch_model.bin) beside config.json")


# families whose config records no context length (ALiBi has no position table to size): the
# length they were trained at (BLOOM's paper: sequences of 2048 tokens)
_TRAINED_CONTEXT = {"bloom": 2048}


POSITION_TABLE_ROWS = "graphopt.position_table_rows"

# families whose positions start after the padding id (RoBERTa's create_position_ids_from_input_ids):
# a table of max_position_embeddings rows holds max_position_embeddings - pad_token_id - 1 positions
_PADDING_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm",
                             "data2vec-text", "mpnet", "ibert", "xmod", "luke", "longformer", "esm"}


def _max_positions(cfg) -> int | None:
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value >= 2:
            if getattr(cfg, "model_type", None) in _PADDING_OFFSET_POSITIONS and attr == "max_position_embeddings":
                pad = getattr(cfg, "pad_token_id", None)
                value -= (pad if isinstance(pad, int) and pad >= 0 else 1) + 1
            return value
    return _TRAINED_CONTEXT.get(getattr(cfg, "model_type", None))


def config_positions(config: dict) -> int | None:
    """The positions a Hugging Face config.json (as a dict) lets the model take."""
    return _max_positions(types.SimpleNamespace(**config))


EXPERTS_IMPLEMENTATION = "graphopt"

# modeling modules whose rotary is complex-valued (torch.polar; view_as_complex in
# apply_rotary_emb), which neither ONNX exporter takes: -> the axis along which their
# apply_rotary_emb broadcasts the [batch, seq, head / 2] table against Q and K
_COMPLEX_ROTARY = {"transformers.models.deepseek_v2.modeling_deepseek_v2": 1, "transformers.models.llama4.modeling_llama4": 2}


@contextlib.contextmanager
def _real_rotary(model):
    """For the duration, a model whose rotary embedding is complex (DeepSeek-V2, Llama 4) computes the
    same rotation in real numbers: its rotary module returns (cos, sin) stacked on a last axis of
    2 in place of `polar(1, freqs) * scale`, and its `apply_rotary_emb` rotates each pair
    (x[2i], x[2i+1]) by them, as multiplying by the complex number would."""
    import sys

    import torch

    name = type(model).__module__
    axis = _COMPLEX_ROTARY.get(name)
    module = sys.modules.get(name)
    if axis is None or module is None or not hasattr(module, "apply_rotary_emb"):
        yield
        return
    rotaries = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding") and hasattr(m, "inv_freq")]

    def rotary_forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        return torch.stack([torch.cos(freqs), torch.sin(freqs)], dim=-1) * self.attention_scaling

    def apply_rotary_emb(xq, xk, freqs):
        cos, sin = freqs[..., 0].unsqueeze(axis), freqs[..., 1].unsqueeze(axis)

        def rotate(x):
            pairs = x.float().reshape(*x.shape[:-1], -1, 2)
            a, b = pairs[..., 0], pairs[..., 1]
            return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(3).type_as(x)
        return rotate(xq), rotate(xk)

    original = module.apply_rotary_emb
    module.apply_rotary_emb = apply_rotary_emb
    for m in rotaries:
        m.forward = rotary_forward.__get__(m)
    try:
        yield
    finally:
        module.apply_rotary_emb = original
        for m in rotaries:
            del m.forward


@contextlib.contextmanager
def _traceable_experts(model):
    """For the duration, `model`'s mixture-of-experts blocks (if any) trace to a static graph
    (`_experts_forward`): a block with SwiGLU experts (gate and up stacked, no biases) as one
    graphopt.MoE node, any other running every expert on every token, each expert's
    projections registered as parameters of their own (views of the stacked ones) so that the
    export holds them as separate weights, as it holds any linear layer's."""
    import torch

    blocks = [m for m in model.modules() if hasattr(m, "has_gate") and hasattr(m, "down_proj")]
    if not blocks or not hasattr(model, "set_experts_implementation"):
        yield
        return
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if EXPERTS_IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, _experts_forward)
    before = model.get_experts_implementation()
    for m in blocks:
        m._graphopt_moe = _is_swiglu_block(m)
        if m._graphopt_moe:
            _define_moe_op()
            continue
        m._graphopt_moe_form = _gated_form(m)
        if m._graphopt_moe_form is not None:  # GPT-OSS's: graphopt.MoE with its biases and clamp
            _define_moe_op()
            m._graphopt_stacked = torch.nn.ParameterList(
                torch.nn.Parameter(t, requires_grad=False) for t in _moe_layout(m, m._graphopt_moe_form["interleaved"]))
            continue
        up = m.gate_up_proj if m.has_gate else m.up_proj
        stacked = [up, m.down_proj]
        if m.has_bias:
            stacked += [m.gate_up_proj_bias if m.has_gate else m.up_proj_bias, m.down_proj_bias]
        m._graphopt_experts = torch.nn.ModuleList(
            torch.nn.ParameterList([torch.nn.Parameter(t[e], requires_grad=False) for t in stacked])
            for e in range(up.shape[0]))
    model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    try:
        yield
    finally:
        model.set_experts_implementation(before)
        for m in blocks:
            del m._graphopt_moe
            for name in ("_graphopt_experts", "_graphopt_moe_form", "_graphopt_stacked"):
                if hasattr(m, name):
                    delattr(m, name)


@contextlib.contextmanager
def _traceable_dbrx_experts(model):
    """For the duration, DBRX's experts blocks (`mlp.w1`, `mlp.v1`, `mlp.w2`, each [experts *
    inner, hidden]: gate, up and down^T; `forward(hidden_states, top_k_index, top_k_weights)`
    looping over the experts hit, which does not trace) run `_dbrx_experts_forward`: one
    graphopt.MoE node where the gate's activation is SiLU, else every expert on every token."""
    import torch

    blocks = [m for m in model.modules() if isinstance(getattr(m, "mlp", None), torch.nn.Module)
              and all(isinstance(getattr(m.mlp, n, None), torch.nn.Parameter) for n in ("w1", "v1", "w2"))
              and hasattr(m, "num_experts") and hasattr(m, "ffn_hidden_size")]
    for m in blocks:
        shape = (m.num_experts, m.ffn_hidden_size, -1)
        gate, up, down = (getattr(m.mlp, n).detach().reshape(shape) for n in ("w1", "v1", "w2"))
        probe = torch.linspace(-6, 6, 49)
        with torch.no_grad():
            silu = bool(torch.allclose(m.mlp.activation_fn(probe), torch.nn.functional.silu(probe), rtol=0, atol=1e-6))
        if silu:
            _define_moe_op()
        # graphopt.MoE's layout: up [experts, 2 * inner, hidden] (gate rows first), down [experts, hidden, inner]
        m._graphopt_stacked = torch.nn.ParameterList(torch.nn.Parameter(t.contiguous(), requires_grad=False) for t in (
            torch.cat([gate, up], dim=1), down.transpose(1, 2)))
        m._graphopt_moe = silu
        m.forward = _dbrx_experts_forward.__get__(m)
    try:
        yield
    finally:
        for m in blocks:
            del m.forward, m._graphopt_stacked, m._graphopt_moe


def _dbrx_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """DbrxExperts.forward, traceable (see `_traceable_dbrx_experts`)."""
    import torch

    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    up, down = self._graphopt_stacked
    weights = top_k_weights.to(x.dtype)
    if self._graphopt_moe:
        return torch.ops.graphopt.moe(x, top_k_index, weights, up, down).reshape(shape)
    inner = up.shape[1] // 2
    out = None
    for e in range(up.shape[0]):
        weight = _routed_weight(top_k_index, weights, e)
        h = self.mlp.activation_fn(x @ up[e, :inner].T) * (x @ up[e, inner:].T)
        h = (h @ down[e].T) * weight
        out = h if out is None else out + h
    return out.reshape(shape)


def _is_swiglu_block(m) -> bool:
    """An experts module graphopt.MoE holds as it is: gate and up stacked [experts, 2 * inner,
    hidden] (gate first), down [experts, hidden, inner], SiLU on the gate, no biases, no norm."""
    import torch
    from transformers.integrations.moe import _default_apply_gate

    if not (m.has_gate and m.is_concatenated and not m.has_bias and not m.is_transposed
            and not m.has_post_expert_norm and getattr(type(m), "_apply_gate", None) is _default_apply_gate):
        return False
    probe = torch.linspace(-6, 6, 49)
    with torch.no_grad():
        return bool(torch.allclose(m.act_fn(probe), torch.nn.functional.silu(probe), rtol=0, atol=1e-6))


def _gated_form(m) -> dict | None:
    """A gated experts block with both biases whose gate function, probed, is a SwiGLU in the
    [gate; up] or the interleaved layout, plain or GPT-OSS's clamped one (its `alpha` and `limit`,
    up + 1): {"interleaved", "alpha", "beta", "limit"}; else None."""
    import torch

    if not (m.has_gate and m.has_bias and not m.has_post_expert_norm):
        return None
    probe = torch.linspace(-12, 12, 8 * 24).reshape(8, 24)  # [tokens, 2 * 12]
    with torch.no_grad():
        got = m._apply_gate(probe)
    alpha, limit = float(getattr(m, "alpha", 1.0)), float(getattr(m, "limit", 0.0) or 0.0)
    forms = [(1.0, 0.0, 0.0), (alpha, 1.0, limit)] if hasattr(m, "alpha") else [(1.0, 0.0, 0.0)]
    for interleaved in (False, True):
        gate, up = (probe[:, ::2], probe[:, 1::2]) if interleaved else probe.chunk(2, dim=-1)
        for a, beta, lim in forms:
            g, u = (gate.clamp(max=lim), up.clamp(-lim, lim)) if lim else (gate, up)
            want = g * torch.sigmoid(a * g) * (u + beta)
            if got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-5):
                return {"interleaved": interleaved, "alpha": a, "beta": beta, "limit": lim}
    return None


def _moe_layout(m, interleaved: bool) -> list:
    """The block's stacked weights in graphopt.MoE's layout: up [experts, 2 * inner, hidden]
    (gate rows, then up rows), down [experts, hidden, inner], their biases."""
    import torch

    up, down = m.gate_up_proj.detach(), m.down_proj.detach()
    up_bias, down_bias = m.gate_up_proj_bias.detach(), m.down_proj_bias.detach()
    if m.is_transposed:  # stored [experts, in, out]
        up, down = up.transpose(1, 2), down.transpose(1, 2)
    if interleaved:
        up = torch.cat([up[:, 0::2], up[:, 1::2]], dim=1)
        up_bias = torch.cat([up_bias[:, 0::2], up_bias[:, 1::2]], dim=1)
    return [t.contiguous() for t in (up, down, up_bias, down_bias)]


def _experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers' experts forward (`integrations.moe`; `top_k_index`/`top_k_weights`
    [tokens, k] from the router), traceable: graphopt.MoE for a SwiGLU block; otherwise
    every expert on every token, expert e's output times the sum of the weights with which the
    router chose e for that token (zero if it did not), the arithmetic of its `batched_mm`
    forward pair by pair."""
    import torch

    if self._graphopt_moe:
        return torch.ops.graphopt.moe(hidden_states, top_k_index, top_k_weights.to(hidden_states.dtype),
                                      self.gate_up_proj, self.down_proj)
    if getattr(self, "_graphopt_moe_form", None) is not None:
        form = self._graphopt_moe_form
        return torch.ops.graphopt.moe_biased(hidden_states, top_k_index, top_k_weights.to(hidden_states.dtype),
                                             *self._graphopt_stacked, form["alpha"], form["beta"], form["limit"])
    out = None
    for e, params in enumerate(self._graphopt_experts):
        up, down, up_bias, down_bias = (list(params) + [None, None])[:4]
        weight = _routed_weight(top_k_index, top_k_weights, e)
        h = _expert_linear(hidden_states, up, up_bias, self.is_transposed)
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        h = _expert_linear(h, down, down_bias, self.is_transposed)
        if self.has_post_expert_norm:
            h = self.post_expert_norm(h)
        h = h * weight.to(h.dtype)
        out = h if out is None else out + h
    return out.to(hidden_states.dtype)


def _routed_weight(top_k_index, top_k_weights, e: int):
    """[tokens, 1]: the sum of the weights with which the router chose expert e for each token
    (zero where it did not)."""
    return (top_k_weights * (top_k_index == e).to(top_k_weights.dtype)).sum(-1, keepdim=True)


def _expert_linear(x, weight, bias, transposed: bool):
    """One expert's projection: `weight` [out, in] (nn.Linear's), or [in, out] when `transposed`."""
    import torch

    if not transposed:
        return torch.nn.functional.linear(x, weight, bias)
    y = x @ weight
    return y if bias is None else y + bias


_moe_op_defined = False


def _moe_eager(x, index, weights, up, down, up_bias=None, down_bias=None, alpha=1.0, beta=0.0, limit=0.0):
    """graphopt.MoE in torch (the custom ops' eager form): every expert, weighted by the router's
    weight for it; the gated activation min(g, limit) * sigmoid(alpha * min(g, limit)) *
    (clip(u, -limit, limit) + beta), plain SwiGLU at (1, 0, 0)."""
    import torch

    y = torch.zeros_like(x)
    for e in range(up.shape[0]):
        w = (weights * (index == e).to(weights.dtype)).sum(-1, keepdim=True)
        gate, u = torch.nn.functional.linear(x, up[e], None if up_bias is None else up_bias[e]).chunk(2, dim=-1)
        if limit:
            gate, u = gate.clamp(max=limit), u.clamp(-limit, limit)
        h = gate * torch.sigmoid(alpha * gate) * (u + beta)
        y = y + torch.nn.functional.linear(h, down[e], None if down_bias is None else down_bias[e]) * w
    return y


def _define_moe_op() -> None:
    """`torch.ops.graphopt.moe` (x, index, weights, up, down): graphopt.MoE with SwiGLU experts,
    an opaque op to torch.export that both ONNX exporters write as one graphopt.MoE node."""
    global _moe_op_defined
    if _moe_op_defined:
        return
    import onnx
    import onnxscript
    import torch
    from onnx.defs import OpSchema

    from graphopt.frontends.torch_export import register_translation
    from graphopt.ir import CANONICAL_OPSET, GRAPHOPT_DOMAIN

    @torch.library.custom_op("graphopt::moe", mutates_args=(),
                             schema="(Tensor x, Tensor index, Tensor weights, Tensor up, Tensor down) -> Tensor")
    def moe(x, index, weights, up, down):
        return _moe_eager(x, index, weights, up, down)

    @moe.register_fake
    def _(x, index, weights, up, down):
        return torch.empty_like(x)

    @torch.library.custom_op("graphopt::moe_biased", mutates_args=(),
                             schema="(Tensor x, Tensor index, Tensor weights, Tensor up, Tensor down, Tensor up_bias, "
                                    "Tensor down_bias, float alpha, float beta, float limit) -> Tensor")
    def moe_biased(x, index, weights, up, down, up_bias, down_bias, alpha, beta, limit):
        return _moe_eager(x, index, weights, up, down, up_bias, down_bias, alpha, beta, limit)

    @moe_biased.register_fake
    def _(x, index, weights, up, down, up_bias, down_bias, alpha, beta, limit):
        return torch.empty_like(x)

    if not onnx.defs.has("MoE", GRAPHOPT_DOMAIN):  # onnxscript builds a node only from a schema
        param = OpSchema.FormalParameter
        onnx.defs.register_schema(OpSchema(
            "MoE", GRAPHOPT_DOMAIN, 1,
            inputs=[param(n, t) for n, t in (("X", "T"), ("index", "I"), ("weights", "T"), ("W_up", "T"),
                                             ("W_down", "T"))]
            + [param(n, "T", "", param_option=OpSchema.FormalParameterOption.Optional) for n in ("up_bias", "down_bias")],
            outputs=[param("Y", "T")],
            type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"], ""),
                              ("I", ["tensor(int64)", "tensor(int32)"], "")],
            attributes=[OpSchema.Attribute("activation", OpSchema.AttrType.STRING, ""),
                        OpSchema.Attribute("gated", OpSchema.AttrType.INT, "")]
            + [OpSchema.Attribute(n, OpSchema.AttrType.FLOAT, "") for n in ("alpha", "beta", "limit")]))
    domain = onnxscript.values.Opset(GRAPHOPT_DOMAIN, 1)

    def moe_onnx(x, index, weights, up, down):
        return domain.MoE(x, index, weights, up, down, activation="silu", gated=1)

    def moe_symbolic(g, x, index, weights, up, down):
        return g.op(f"{GRAPHOPT_DOMAIN}::MoE", x, index, weights, up, down, activation_s="silu", gated_i=1)

    def moe_biased_onnx(x, index, weights, up, down, up_bias, down_bias, alpha, beta, limit):
        return domain.MoE(x, index, weights, up, down, up_bias, down_bias, activation="silu", gated=1,
                          alpha=float(alpha), beta=float(beta), limit=float(limit))

    @torch.onnx.symbolic_helper.parse_args("v", "v", "v", "v", "v", "v", "v", "f", "f", "f")
    def moe_biased_symbolic(g, x, index, weights, up, down, up_bias, down_bias, alpha, beta, limit):
        return g.op(f"{GRAPHOPT_DOMAIN}::MoE", x, index, weights, up, down, up_bias, down_bias, activation_s="silu",
                    gated_i=1, alpha_f=alpha, beta_f=beta, limit_f=limit)

    register_translation(torch.ops.graphopt.moe.default, moe_onnx)
    register_translation(torch.ops.graphopt.moe_biased.default, moe_biased_onnx)
    torch.onnx.register_custom_op_symbolic("graphopt::moe", moe_symbolic, CANONICAL_OPSET)
    torch.onnx.register_custom_op_symbolic("graphopt::moe_biased", moe_biased_symbolic, CANONICAL_OPSET)
    _moe_op_defined = True


def _class_name(model) -> str:
    return type(model).__name__


def _wrapper_class():
    import torch

    class HFWrapper(torch.nn.Module):
        """(input_ids, attention_mask[, token_type_ids]) -> logits or last_hidden_state, with no KV cache."""

        def __init__(self, model, output: str):
            super().__init__()
            self.model = model
            self.output = output

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            if self.output == "logits":
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True)
            elif token_type_ids is not None:
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                 return_dict=True)
            else:
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
            return getattr(out, self.output)

    return HFWrapper


@contextlib.contextmanager
def _offline_and_quiet():
    """No network (HF_HUB_OFFLINE=1 for the duration), no progress bars or advice on the
    console: a load either works or raises."""
    import transformers

    logging_ = transformers.utils.logging
    old_env = os.environ.get("HF_HUB_OFFLINE")
    old_level = logging_.get_verbosity()
    bars = logging_.is_progress_bar_enabled()
    os.environ["HF_HUB_OFFLINE"] = "1"
    logging_.set_verbosity_error()
    logging_.disable_progress_bar()
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env
        logging_.set_verbosity(old_level)
        if bars:
            logging_.enable_progress_bar()


def _first_line(e: BaseException) -> str:
    """The first line of an error; a line that ends in ':' goes on with the next (the detail)."""
    lines = [line.strip() for line in (str(e).strip() or type(e).__name__).splitlines() if line.strip()]
    text = lines[0] if not lines[0].endswith(":") or len(lines) == 1 else f"{lines[0]} {lines[1]}"
    return text[:200]
