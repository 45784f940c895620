"""`graphopt generate`: continue text with a training checkpoint (torch) or with a
generation-ready artifact (its backend: ort or tvm), streaming it, then time to first token
and decode tokens/s on stderr.

A checkpoint runs graphopt.train's own loop (`graphopt.train.generate`); this command
replaces graphopt.train's `generate` in the CLI, so the train package stays free of the
compiler.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from graphopt.errors import UserError
from graphopt.click_types import MAX_THREADS, FiniteFloatRange
from graphopt.train.options import click_type

_BACKENDS = {"auto": None, "torch": "torch", "ort": "onnxruntime", "onnxruntime": "onnxruntime", "tvm": "tvm"}


@click.command("generate")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--prompt", "prompts", multiple=True, required=True,
              help="Text to continue; repeat it for a batch (left-padded, artifacts only).")
@click.option("--backend", type=click.Choice(list(_BACKENDS)), default="auto", show_default=True,
              help="torch for a checkpoint; an artifact runs on the backend it was built for.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
              help="New tokens at most  [default: 200, or what the model's context leaves after the prompt]")
@click.option("--temperature", type=FiniteFloatRange(min=0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 = no top-k filter.")
@click.option("--top-p", type=FiniteFloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True,
              help="1 = no nucleus filter.")
@click.option("--seed", type=click_type("seed"), default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1, max=MAX_THREADS), default=None,
              help="Intra-op threads of the runtime (artifacts).")
def generate(model, prompts, backend, max_new_tokens, temperature, top_k, top_p, seed, threads):
    """Continue --prompt with MODEL, streaming tokens as they are produced, then print the time
    to first token and the decode tokens/s.

    MODEL is a training checkpoint or a Hugging Face folder (both run on eager torch) or an
    artifact folder that `graphopt optimize` wrote for a decoder (runs on its backend).

    \b
    Examples:
      graphopt generate examples/default --prompt "def "
      graphopt generate hf-model/ --prompt "Once upon a time" --max-new-tokens 32
      graphopt optimize examples/default -o out/default && graphopt generate out/default --prompt "def "
      graphopt generate out/default --prompt "import " --prompt "class " --max-new-tokens 32
      graphopt generate out/default --prompt "import " --temperature 0.8 --top-k 50 --top-p 0.95 --seed 1
    """
    from graphopt.generation_text import check_text

    check_text(prompts)
    if temperature == 0 and (top_k or top_p < 1):
        click.echo("note: --top-k and --top-p filter sampling; at --temperature 0 (the default) decoding is greedy "
                   "and they change nothing (give --temperature, e.g. 0.8, to sample)", err=True)
    wanted = _BACKENDS[backend]
    if (model / "manifest.json").is_file():
        _generate_artifact(model, list(prompts), wanted, max_new_tokens, temperature, top_k, top_p, seed, threads)
        return
    from graphopt.frontends.huggingface import is_hf_config  # here: the IR's import is not paid by --help
    from graphopt.generation import DEFAULT_NEW_TOKENS
    from graphopt.generation_files import model_config

    config = model_config(model) if model.is_dir() else None
    hf = config is not None and is_hf_config(config)
    what = "a Hugging Face folder" if hf else "a checkpoint"
    if wanted not in (None, "torch"):
        raise UserError(f"{model}: {what} runs on torch; for --backend {backend}, optimize it first "
                        f"(graphopt optimize {model} -o OUT --backend {backend}) and generate from OUT")
    if len(prompts) > 1:
        raise UserError(f"{model}: {what} takes one --prompt on torch; for a batch of prompts, optimize it first "
                        f"(graphopt optimize {model} -o OUT) and generate from OUT")
    if hf:
        _generate_hf(model, config, prompts[0], max_new_tokens, temperature, top_k, top_p, seed)
        return
    _generate_checkpoint(model, prompts[0], max_new_tokens or DEFAULT_NEW_TOKENS, temperature, top_k, top_p, seed)


def _generate_hf(folder: Path, config: dict, prompt: str, max_new_tokens, temperature, top_k, top_p, seed):
    """A Hugging Face folder on eager PyTorch: its `generate` (KV cache, greedy or sampled),
    stopping at any of its EOS ids, the text streamed as it comes."""
    import torch

    from graphopt.frontends.huggingface import _max_positions, load_hf_module
    from graphopt.generation import fit_new_tokens
    from graphopt.generation_files import model_eos_ids
    from graphopt.generation_text import TextStream, check_ids_fit, load_tokenizer

    tok = load_tokenizer(folder, hint="copy the model's tokenizer.json there, or optimize the folder (graphopt "
                                      "optimize) and generate from token ids with graphopt.load(OUT).generate([[ids...]])")
    model, output = load_hf_module(folder, config)
    if output != "logits":
        raise UserError(f"{folder}: {type(model).__name__} is not a causal language model: nothing to generate")
    ids = tok.encode(prompt).ids
    if not ids:
        raise UserError("--prompt encodes to no tokens")
    check_ids_fit(ids, getattr(model.config, "vocab_size", None), folder)
    max_new_tokens, note = fit_new_tokens(len(ids), _max_positions(model.config), max_new_tokens, folder)
    if note:
        click.echo(note, err=True)
    eos = model_eos_ids(folder, config)
    text = TextStream(tok, ids)
    new: list[int] = []
    first: list[float] = []
    seen_prompt: list[bool] = []
    stopped = False

    class Stream:  # transformers' streamer protocol: put(token ids), the prompt first; end()
        def put(self, value):
            nonlocal stopped
            if not seen_prompt:
                seen_prompt.append(True)
                return
            if not first:
                first.append(time.perf_counter() - t0)
                sys.stdout.write(prompt)
            token = int(value.reshape(-1)[0])
            if token in eos or stopped:  # the EOS ends the text (not printed), as on an artifact
                stopped = True
                return
            new.append(token)
            sys.stdout.write(text.put([token]))
            sys.stdout.flush()

        def end(self):
            pass

    torch.manual_seed(seed)
    pad = next((t for t in (config.get("pad_token_id"), eos[0] if eos else None) if t is not None), 0)
    sample = temperature > 0
    options = dict(do_sample=sample, temperature=temperature if sample else None, top_k=top_k if sample else None,
                   top_p=top_p if sample else None)
    if eos:
        options["eos_token_id"] = list(eos)
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
                       max_new_tokens=max_new_tokens, streamer=Stream(), pad_token_id=pad, **options)
    total = time.perf_counter() - t0
    sys.stdout.write(("" if first else prompt) + text.end() + "\n")
    sys.stdout.flush()  # the text's line ends before the timing on stderr
    if first:
        _report_timing(first[0], total - first[0], max(len(new) - 1, 0), len(new), 1, "torch")


def _report_timing(ttft_s: float, decode_s: float, decode_tokens: int, tokens: int, batch: int, backend: str,
                   about: str = "") -> None:
    """Time to first token and, where a decode step made tokens, their rate (stderr)."""
    rate = f", decode {decode_tokens / decode_s:.1f} tokens/s" if decode_tokens > 0 and decode_s > 0 else ""
    click.echo(f"time to first token {ttft_s * 1000:.1f} ms{rate} ({about}{tokens} new tokens in all, batch {batch}, "
               f"{backend})", err=True)


def _generate_checkpoint(model: Path, prompt: str, max_new_tokens, temperature, top_k, top_p, seed):
    """graphopt.train's own loop (eager torch with its KV cache, token healing)."""
    from graphopt.train.checkpoint import load_model, resolve_checkpoint
    from graphopt.train.generate import generate as train_generate
    from graphopt.train.tokenizer import check_fits, load_tokenizer

    folder = resolve_checkpoint(model)
    m, _ = load_model(folder)
    tok = load_tokenizer(folder / "tokenizer.json")
    check_fits(tok, m.config.vocab_size, folder / "tokenizer.json")
    first: list[float] = []

    def on_text(piece: str) -> None:
        if not first:
            first.append(time.perf_counter() - t0)
            sys.stdout.write(prompt)  # only once generation runs: a refusal leaves stdout empty
        sys.stdout.write(piece)
        sys.stdout.flush()

    t0 = time.perf_counter()
    text = train_generate(m, tok, prompt, max_new_tokens, temperature, top_k, top_p, seed, on_text)
    total = time.perf_counter() - t0
    sys.stdout.write(("" if first else prompt) + "\n")
    n = len(tok.encode(text).ids)  # (re-encoded: about the number generated)
    if first:
        _report_timing(first[0], total - first[0], n - 1, n, 1, "torch", about="about ")


def _generate_artifact(folder: Path, prompts, wanted, max_new_tokens, temperature, top_k, top_p, seed, threads):
    import graphopt
    from graphopt.generation import Generator, fit_new_tokens
    from graphopt.generation_text import encode_prompts, load_tokenizer

    artifact = graphopt.load(folder, threads=threads)
    if wanted is not None and wanted != artifact.backend:
        instead = ("for torch, generate from the model it was optimized from (graphopt generate MODEL)"
                   if wanted == "torch" else f"optimize the model again with --backend {wanted} for that")
        raise UserError(f"{folder}: the artifact was built for {artifact.backend}, not {wanted}; {instead}")
    if not artifact.manifest.get("generation"):
        why_not = artifact.manifest.get("not_generation_ready")
        raise UserError(f"{folder}: not a generation-ready artifact: " + (
            f"optimize could not add the KV cache ({why_not})" if why_not else
            "no KV cache (optimize the decoder again without --no-kv-cache or --passes)"))
    tok = load_tokenizer(folder)
    gen = Generator.for_artifact(artifact)
    ids, allowed, healed = encode_prompts(artifact, tok, prompts)
    max_new_tokens, note = fit_new_tokens(max(map(len, ids)), gen.spec.max_positions, max_new_tokens, folder)
    if note:
        click.echo(note, err=True)
    stream = len(prompts) == 1
    shown = {"prompt": False}

    def on_text(row: int, piece: str) -> None:
        if not stream:
            return
        if not shown["prompt"]:  # once generation runs: a refusal (too long, ...) leaves stdout empty
            sys.stdout.write(prompts[0])
            shown["prompt"] = True
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = gen.generate_text(tok, ids, max_new_tokens, healed=healed, on_text=on_text, temperature=temperature,
                               top_k=top_k, top_p=top_p, seed=seed, allowed_first=allowed)
    if stream:
        on_text(0, "")
        sys.stdout.write("\n")
    else:
        for prompt, text in zip(prompts, result.texts):
            click.echo(prompt + text)
    _report_timing(result.ttft_s, result.decode_s, result.decode_tokens, sum(len(r) for r in result.tokens),
                   len(prompts), artifact.backend)
