"""Capture cost of peer libraries, each against its own bare forward pass in the same process.

Run by ``benchmarks/run.py`` with any Python that has torch and transformers (and, for a peer to be measured,
the peer itself); it imports nothing from traitlens, so it runs in a throwaway virtual environment:

    python benchmarks/peers.py --peer nnsight --folder ~/.cache/traitlens/smollm2-135m-instruct-v1-transformers5

It prints one JSON object per line: ``{"key", "label", "peer", "version", "status", "reason", "ms",
"bare_ms", "ratio"}``; ``status`` is ``"ok"``, ``"not installed"`` or ``"failed"``. Every peer works on
the same workload as run.py: seeded random token ids, no padding, all decoder layers captured.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import statistics
import sys
import time
import traceback

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PEERS = ("nnsight", "transformer_lens_bridge", "transformer_lens_legacy", "steering_vectors")
DISTRIBUTION = {
    "nnsight": "nnsight",
    "transformer_lens_bridge": "transformer-lens",
    "transformer_lens_legacy": "transformer-lens",
    "steering_vectors": "steering-vectors",
}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _load(folder: str | None, shape: str | None, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    if folder:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        with torch.no_grad():  # weights into ordinary memory (transformers 5 maps them from the file)
            for t in [*model.parameters(), *model.buffers()]:
                t.data = t.data.clone()
        return model.to(device).eval()
    config = LlamaConfig(**json.loads(shape), max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype=dtype).eval()


def _tokenizer(folder: str | None):
    if not folder:  # a random-weight model has no tokenizer; inputs are ids, but nnsight wants one anyway
        from tokenizers import Tokenizer
        from tokenizers.models import WordLevel
        from transformers import PreTrainedTokenizerFast

        words = Tokenizer(WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>"))
        return PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", unk_token="<unk>")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    except Exception:  # a tokenizer saved by transformers 5 does not load in 4.x; ids are given anyway
        return None


def _peer_case(peer: str, model, folder, shape, device, dtype):
    """``(label, run(batches))`` for ``peer``; importing the peer here raises ImportError if it is absent."""
    n_layers = model.config.num_hidden_layers
    if peer == "nnsight":
        from nnsight import LanguageModel

        lm = LanguageModel(model, tokenizer=_tokenizer(folder))

        def run(batches):
            kept = []
            for batch in batches:
                saved = []
                with lm.trace(batch):
                    for i in range(n_layers):
                        saved.append(lm.model.layers[i].output.save())
                kept.append(saved)
            return kept

        return "nnsight `trace` saving every decoder layer's output", run, None
    if peer == "transformer_lens_bridge":
        from transformer_lens.model_bridge import TransformerBridge

        # The bridge forces eager attention on the model it is given: give it its own copy.
        own = _load(folder, shape, device, dtype)
        bridge = TransformerBridge.boot_transformers(
            folder or "random", hf_model=own, tokenizer=_tokenizer(folder), device=str(device), dtype=dtype
        )
        names = {f"blocks.{i}.hook_out" for i in range(n_layers)}

        def run(batches):
            kept = []
            for batch in batches:
                _, cache = bridge.run_with_cache(batch["input_ids"], names_filter=lambda n: n in names)
                if len(cache) != n_layers:
                    raise RuntimeError(f"expected {n_layers} cached block outputs, got {list(cache)[:5]}")
                kept.append(cache)
            return kept

        def own_bare(batches):  # the bridge's own forward pass: its copy of the model, eager attention
            for batch in batches:
                bridge(batch["input_ids"])

        return "TransformerLens `TransformerBridge.run_with_cache` (every block output)", run, own_bare
    if peer == "transformer_lens_legacy":
        import transformer_lens

        if not hasattr(transformer_lens, "HookedTransformer") or _major(_version("transformer-lens")) >= 4:
            raise ImportError(
                "HookedTransformer was removed in TransformerLens 4 (install transformer-lens<3)"
            )
        legacy = _legacy_hooked_transformer(model, device, dtype)
        ids = torch.arange(3, 35, device=device).view(2, 16)
        with torch.no_grad():
            agree = (legacy(ids).argmax(-1) == model(input_ids=ids).logits.argmax(-1)).float().mean().item()
        if agree < 0.9:  # the hand-built config must reproduce the model, or the timing means nothing
            raise RuntimeError(
                f"converted HookedTransformer agrees with the model on {agree:.0%} of top-1 tokens"
            )

        def run(batches):
            names = {f"blocks.{i}.hook_resid_post" for i in range(n_layers)}
            return [
                legacy.run_with_cache(batch["input_ids"], names_filter=lambda n: n in names)[1]
                for batch in batches
            ]

        def own_bare(batches):  # its own implementation of the forward pass, not the Hugging Face model's
            for batch in batches:
                legacy(batch["input_ids"])

        return "TransformerLens legacy `HookedTransformer.run_with_cache` (every resid_post)", run, own_bare
    if peer == "steering_vectors":
        from steering_vectors import record_activations

        def run(batches):
            kept = []
            for batch in batches:
                with record_activations(model, layer_type="decoder_block") as acts:
                    model(**batch)
                if len(acts) != n_layers:
                    raise RuntimeError(f"expected {n_layers} recorded layers, got {len(acts)}")
                kept.append(acts)
            return kept

        return "steering-vectors `record_activations` (every decoder block)", run, None
    raise ValueError(f"unknown peer {peer!r}; choose from {PEERS}")


def _major(version: str | None) -> int:
    return int(version.split(".")[0]) if version else 0


def _legacy_hooked_transformer(model, device, dtype):
    """A legacy HookedTransformer with ``model``'s weights, built offline from its config (no hub)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    c = model.config
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size,
        d_head=c.hidden_size // c.num_attention_heads,
        n_heads=c.num_attention_heads,
        n_key_value_heads=c.num_key_value_heads,
        d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers,
        n_ctx=2048,
        d_vocab=c.vocab_size,
        act_fn="silu",
        normalization_type="RMS",
        eps=c.rms_norm_eps,
        positional_embedding_type="rotary",
        rotary_base=int(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]),
        rotary_adjacent_pairs=False,
        rotary_dim=c.hidden_size // c.num_attention_heads,
        final_rms=True,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        device=str(device),
        dtype=dtype,
    )
    legacy = HookedTransformer(cfg)
    legacy.load_and_process_state_dict(
        convert_llama_weights(model, cfg), fold_ln=True, center_writing_weights=True, center_unembed=True
    )
    return legacy.eval()


def measure(args) -> dict:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    version = _version(DISTRIBUTION[args.peer])
    row = {"key": args.peer, "peer": args.peer, "version": version, "label": args.peer}
    if version is None:
        return {**row, "status": "not installed", "reason": f"{DISTRIBUTION[args.peer]} is not installed"}
    try:
        model = _load(args.folder, args.shape, device, dtype)
        label, run, own_bare = _peer_case(args.peer, model, args.folder, args.shape, device, dtype)
    except ImportError as e:
        return {**row, "status": "not installed", "reason": f"{type(e).__name__}: {e}".splitlines()[0]}
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        return {**row, "status": "failed", "reason": f"setup: {type(e).__name__}: {e}".splitlines()[0]}
    row["label"] = label
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(0, args.n_prompts, args.batch_size):
        ids = torch.randint(3, model.config.vocab_size, (args.batch_size, args.seq_len), generator=generator)
        batches.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)})

    def bare(bs):
        for batch in bs:
            model(**batch)

    # A peer that runs its own forward pass (TransformerLens) is measured against that pass without hooks,
    # so that its ratio is the cost of its capture, not the speed of its forward pass.
    cases = {"bare": own_bare or bare, "peer": run}
    row["baseline"] = "the peer's own forward pass" if own_bare else "the Hugging Face model's forward pass"
    times: dict[str, list[float]] = {k: [] for k in cases}
    try:
        with torch.no_grad():
            for fn in cases.values():  # warm-up on one batch
                fn(batches[:1])
            for rep in range(args.reps):
                order = list(cases) if rep % 2 == 0 else list(reversed(cases))
                for key in order:
                    _sync(device)
                    start = time.perf_counter()
                    kept = cases[key](batches)
                    _sync(device)
                    times[key].append(time.perf_counter() - start)
                    del kept
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        return {**row, "status": "failed", "reason": f"run: {type(e).__name__}: {e}".splitlines()[0]}
    bare_s, peer_s = statistics.median(times["bare"]), statistics.median(times["peer"])
    return {
        **row,
        "status": "ok",
        "reason": "",
        "ms": peer_s * 1e3,
        "bare_ms": bare_s * 1e3,
        "ratio": peer_s / bare_s,
        "bare_spread": (max(times["bare"]) - min(times["bare"])) / bare_s,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", choices=PEERS, required=True)
    parser.add_argument("--folder", help="a Hugging Face model folder")
    parser.add_argument("--shape", help="JSON of LlamaConfig arguments for a random-weight model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--n-prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    if not (args.folder or args.shape):
        parser.error("give --folder or --shape")
    with contextlib.redirect_stdout(sys.stderr):  # peers print progress; keep stdout for the JSON line
        row = measure(args)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
