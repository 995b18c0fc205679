"""The workload and the cases the suite times: each case runs the whole workload once and returns what it
kept (so that memory measurements see it), never the logits.

Models: the bundled SmolLM2-135M-Instruct (float32, CPU by default), or random-weight Llama models built
from a config in the shapes of SmolLM2-135M and Llama-3.2-1B (for the GPU part), or a tiny random Llama
(``--quick``). Inputs are seeded random token ids without padding, so every row has the same length.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from traitlens.capture import ActivationCapture, output_tensor
from traitlens.hooks import HookManager, decoder_layer_paths, resolve_module
from traitlens.positions import last_token_index

# Random-weight shapes. SmolLM2-135M: its config.json. Llama-3.2-1B: its config.json (1.24B parameters).
SHAPES: dict[str, dict] = {
    "tiny": dict(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=512, tie_word_embeddings=True,
    ),
    "smollm2-135m-shape": dict(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
    ),
    "llama-1b-shape": dict(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
    ),
}  # fmt: skip
BUNDLED = "bundled"


@dataclass
class Workload:
    """One model and its inputs: ``batches`` for forward cases, ``gen_batches`` for generation cases."""

    name: str
    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    batches: list[dict[str, torch.Tensor]]
    gen_batches: list[dict[str, torch.Tensor]]
    new_tokens: int
    paths: list[str] = field(default_factory=list)

    @property
    def n_layers(self) -> int:
        return len(self.paths)

    @property
    def stop_layer(self) -> int:
        """The middle layer ``k = L // 2`` where the early-stop case ends the pass."""
        return self.n_layers // 2

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def describe(self) -> str:
        b = self.batches[0]["input_ids"].shape
        g = self.gen_batches[0]["input_ids"].shape
        return (
            f"{self.name}: {self.n_params / 1e6:.0f}M parameters, {self.n_layers} layers, "
            f"hidden {self.model.config.hidden_size}, {str(self.dtype).removeprefix('torch.')} on "
            f"{self.device.type}; forward: {len(self.batches)} batches of {b[0]} x {b[1]} tokens; "
            f"generate: {len(self.gen_batches)} batches of {g[0]} x {g[1]} prompt tokens + "
            f"{self.new_tokens} new tokens (greedy)"
        )


def build_model(name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The bundled model (weights in ordinary memory) or a seeded random-weight Llama of shape ``name``."""
    if name == BUNDLED:
        from traitlens.models import load_model

        model, _ = load_model(dtype=dtype, device=device)
        return model
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**SHAPES[name], max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype=dtype).eval()


def make_workload(
    name: str,
    device: str,
    dtype: torch.dtype,
    *,
    n_prompts: int,
    batch_size: int,
    seq_len: int,
    gen_prompts: int,
    gen_batch_size: int,
    gen_prompt_len: int,
    new_tokens: int,
) -> Workload:
    device = torch.device(device)
    model = build_model(name, device, dtype)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)

    def batches(n: int, size: int, length: int) -> list[dict[str, torch.Tensor]]:
        out = []
        for start in range(0, n, size):
            rows = min(size, n - start)
            ids = torch.randint(3, vocab, (rows, length), generator=generator)
            out.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)})
        return out

    return Workload(
        name=name,
        model=model,
        device=device,
        dtype=dtype,
        batches=batches(n_prompts, batch_size, seq_len),
        gen_batches=batches(gen_prompts, gen_batch_size, gen_prompt_len),
        new_tokens=new_tokens,
        paths=decoder_layer_paths(model),
    )


# ----------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """``run(workload)`` does the whole workload once and returns what it kept."""

    key: str
    label: str
    group: str  # "forward" (ratio to the bare forward pass) or "generate" (ratio to plain generate)
    run: Callable[[Workload], object]


def _with_raw_hooks(w: Workload, keep: Callable, run: Callable[[list], None]) -> list:
    """Register a hook with plain ``register_forward_hook`` on every decoder layer (not via traitlens) that
    appends ``keep(output)`` to a list, call ``run(list)``, remove the hooks; the list is returned."""
    kept: list[torch.Tensor] = []
    hook = lambda m, a, out: kept.append(keep(output_tensor(out).detach()))  # noqa: E731
    handles = [resolve_module(w.model, p).register_forward_hook(hook) for p in w.paths]
    try:
        run(kept)
    finally:
        for h in handles:
            h.remove()
    return kept


def bare(w: Workload) -> None:
    for batch in w.batches:
        w.model(**batch)


def bare_synced(w: Workload) -> None:
    """The bare pass with the host waiting for the GPU after each batch, as ``get`` makes it wait in the
    capture-to-CPU cases: what losing the host's run-ahead between batches costs (a no-op on the CPU)."""
    for batch in w.batches:
        w.model(**batch)
        if w.device.type == "cuda":
            torch.cuda.synchronize(w.device)


def bare_no_head(w: Workload) -> None:
    for batch in w.batches:
        w.model.base_model(**batch)


def plain_hooks_on_device(w: Workload) -> list:
    return _with_raw_hooks(w, lambda x: x, lambda kept: bare(w))


def seed_cpu_hooks(w: Workload) -> list:
    """The seed project's design: every hook calls ``.detach().cpu()`` (a blocking copy on a GPU)."""
    return _with_raw_hooks(w, lambda x: x.cpu(), lambda kept: bare(w))


def pinned_hooks(w: Workload) -> list:
    """Plain hooks copying each output into its own pinned CPU buffer with ``non_blocking=True`` on the
    current stream (one sync per batch): the design traitlens 0.5 started from."""

    def keep(x):
        return torch.empty(x.shape, dtype=x.dtype, pin_memory=x.is_cuda).copy_(x, non_blocking=True)

    def run(kept):
        for batch in w.batches:
            w.model(**batch)
            if w.device.type == "cuda":
                torch.cuda.synchronize(w.device)

    return _with_raw_hooks(w, keep, run)


def _traitlens(w: Workload, capture: ActivationCapture, *, last_token: bool = False) -> list:
    """Hooks on every layer; per batch, ``get`` each layer (one sync on a GPU), then ``clear``."""
    kept = []
    with HookManager(w.model) as hooks:
        for i, path in enumerate(w.paths):
            hooks.add_forward_hook(path, capture.make_hook(str(i)))
        for batch in w.batches:
            if last_token:
                capture.positions = last_token_index(batch["attention_mask"])
            w.model(**batch)
            kept.append([capture.get(str(i)) for i in range(w.n_layers)])
            capture.clear()
    return kept


def traitlens_on_device(w: Workload) -> list:
    return _traitlens(w, ActivationCapture(device=None))


def traitlens_to_cpu(w: Workload) -> list:
    return _traitlens(w, ActivationCapture())


def traitlens_last_token(w: Workload) -> list:
    return _traitlens(w, ActivationCapture(), last_token=True)


def traitlens_early_stop(w: Workload) -> list:
    """Capture layer ``k`` (full sequence, to CPU) and stop the pass right after it."""
    capture, kept, k = ActivationCapture(), [], w.stop_layer
    for batch in w.batches:
        with HookManager(w.model) as hooks:
            hooks.add_forward_hook(w.paths[k], capture.make_hook("k"))
            hooks.stop_after(w.paths[k])
            w.model(**batch)
        kept.append(capture.get("k"))
        capture.clear()
    return kept


def hidden_states(w: Workload) -> list:
    return [w.model(**batch, output_hidden_states=True).hidden_states for batch in w.batches]


def _generate(w: Workload, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return w.model.generate(
            **batch,
            max_new_tokens=w.new_tokens,
            min_new_tokens=w.new_tokens,
            do_sample=False,
            pad_token_id=0,
        )


def generate_plain(w: Workload) -> list:
    return [_generate(w, batch) for batch in w.gen_batches]


def generate_traitlens(w: Workload) -> list:
    """Every layer, every token (prompt and each decode step) to CPU, joined per layer after each batch."""
    capture, kept = ActivationCapture(), []
    with HookManager(w.model) as hooks:
        for i, path in enumerate(w.paths):
            hooks.add_forward_hook(path, capture.make_hook(str(i)))
        for batch in w.gen_batches:
            kept.append(_generate(w, batch))
            kept.append([capture.get(str(i)) for i in range(w.n_layers)])
            capture.clear()
    return kept


def generate_seed_cpu_hooks(w: Workload) -> list:
    return _with_raw_hooks(
        w, lambda x: x.cpu(), lambda kept: kept.extend(_generate(w, b) for b in w.gen_batches)
    )


CASES: list[Case] = [
    Case("bare", "bare forward `model(**batch)` (baseline)", "forward", bare),
    Case("no_head", "bare forward without the LM head `model.model(**batch)`", "forward", bare_no_head),
    Case("plain_device", "plain hooks keeping outputs on the device (all layers)", "forward", plain_hooks_on_device),
    Case("seed_cpu", "seed design: hooks calling `.detach().cpu()` (all layers)", "forward", seed_cpu_hooks),
    Case("pinned", "plain hooks copying into pinned CPU buffers, `non_blocking=True`, same stream (all layers)", "forward", pinned_hooks),
    Case("tl_device", "traitlens `ActivationCapture(device=None)`, all layers, full sequence", "forward", traitlens_on_device),
    Case("tl_cpu", "traitlens `ActivationCapture()` to CPU (from a GPU: pinned, non-blocking, large chunks on a side stream), all layers, full sequence", "forward", traitlens_to_cpu),
    Case("tl_last", "traitlens last token only (`positions=last_token_index(mask)`), all layers, to CPU", "forward", traitlens_last_token),
    Case("tl_stop", "traitlens early stop: capture layer k = L/2, `HookManager.stop_after`", "forward", traitlens_early_stop),
    Case("hidden_states", "`output_hidden_states=True`", "forward", hidden_states),
    # after the others (the tests address cases by position); raw results from before it have no such key
    Case("bare_sync", "bare forward, the host waiting for the GPU after each batch (as `get` makes it wait)", "forward", bare_synced),
    Case("gen_plain", "plain `generate` (baseline)", "generate", generate_plain),
    Case("gen_tl", "`generate` + traitlens capture of every layer, every token, to CPU", "generate", generate_traitlens),
    Case("gen_seed", "`generate` + seed `.cpu()` hooks on every layer", "generate", generate_seed_cpu_hooks),
]  # fmt: skip
CASE_BY_KEY = {c.key: c for c in CASES}
