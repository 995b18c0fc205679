"""Does traitlens steer and monitor every causal-LM family right? Tiny random models, plain-hook references.

Every family that ``tests/families.py`` builds (its ``build``, ``SKIPS``, eager attention) is steered at one
middle decoder layer ``L`` (``decoder_layer_paths(model)[n // 2]``) with a fixed random direction ``u``
(unit, seeded), passed to traitlens as ``v = SCALE * u`` (not unit, so that "the vector is added as given"
is tested). ``N`` is the median row norm of the layer's output over the real tokens of the right-padded
batch, ``coeff = N / SCALE``, so that the steering adds ``N * u``. The references are plain
``register_forward_hook``s written here (no traitlens), which edit the decoder layer's output (a tuple or
list output: its element 0, the rest returned as is):

- ``add``: ``steer(model, v, layer=L, coeff=coeff, positions="all")`` during one forward pass of a
  right-padded batch of 3 texts (5, 8, 3 words) vs a hook adding ``coeff * v`` at every real token (pads
  are never steered, per steering.py). Logits at real tokens are compared (``add``), and at the pads
  (``pads``: their logits are never used, but they differ exactly when traitlens steered a pad).
- ``add_norm``: ``steer(model, v, layer=L, coeff=0.5, norm=N)`` vs a hook adding ``0.5 * N * u`` (a relative
  coefficient: the vector is scaled to unit length, then to ``coeff * norm``).
- ``gen``, ``prompt``: ``steer(..., positions="generated"/"prompt")`` during
  ``model.generate(max_new_tokens=4, do_sample=False, suppress_tokens=[0, 1, 2, 3])`` on a left-padded batch
  of 3 prompts (6, 3, 4 words) vs the same ``generate`` under a hook that tells the passes apart by their
  input length (a forward pre-hook on the model records it): with the cache the first pass is the prompt
  (``P`` columns, real where the attention mask is 1) and each later pass of one position is a generated
  token; a later pass of ``P + k`` positions (no cache) covers columns ``0 .. P + k - 1``, of which
  ``>= P`` are generated. The generated ids must be equal, and the raw logits of each step
  (``output_logits``) too while the rows agree. A differing id is WRONG unless the reference's own logits
  have the two tokens within ``TIE`` of each other (a float tie, marked "tie").
- ``ablate``: ``steer(..., op="ablate")`` on the right-padded batch: the layer output (read by a hook added
  after ``steer``'s, so it sees the steered output) must have ``|h . u| / |h| <= TOLERANCE`` at every real
  token, and output and logits must equal a hook that removes the component (``h - (h . u) u`` in float64).
- ``mon_gen``, ``mon_text``: ``generate_with_projections(model, tok, TraitVector(v, module=path,
  position="all", method="mean_diff"), prompt, max_new_tokens=5, suppress_tokens=[0, 1, 2, 3])`` and
  ``token_projections`` on the text of the same ids vs the projection onto ``u`` of one plain forward pass
  over the whole sequence (batch 1, ``model(input_ids=ids)``, float32). Error per token: ``|got - ref| /
  |h|`` (the row norm, so that it is on the scale of the other checks). The generated ids must also equal
  those of a plain ``model.generate`` with the same settings. Diagnosis in the JSON: ``vs_generate_path``
  compares the scores with the layer outputs along the model's own ``generate`` (cached) passes, and
  ``generate_path_vs_full`` those with the one forward pass; where traitlens matches the generate path but the
  model's generate path differs from its own forward pass, the cell is marked ``m`` and the family is
  MODEL, not WRONG (the model computes other activations while generating; traitlens reports those).
  In the table ``/gX`` is the error against the generate path where the cell fails anyway.
  Generation settings: ``suppress_tokens=[0, 1, 2, 3]``, ``forced_eos_token_id=None`` (BART-derived configs
  force EOS at the last step, which generate refuses together with the suppression).

Metric: max relative difference (row norms, float64: ``|got - ref| / |ref|``). Above ``TOLERANCE`` a check is
WRONG. A check whose reference itself raises is SKIP for that check (the model cannot do it: e.g. no
``generate`` on text alone); a check where traitlens raises and the reference ran is CRASH. Family status:
WRONG > CRASH > OK (SKIP when nothing could be checked); REF? when the layer's output is not
``[batch, seq, hidden]`` (no reference; what traitlens does with ``positions="all"``/``"prompt"`` is noted).
``effect`` in the JSON is how much the reference's
steering moved the logits (the checks' power: a check whose steering changes nothing cannot fail), and
``moved`` how many generated ids it changed.

``tests/test_families.py`` runs it on every family and fails on any WRONG. For the table (about 40 s on 2
cores for all families), from the repository root:

    .venv/bin/python tests/families_steering.py [--families llama,gpt2] [--out runs/families_steering.json]
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for families and conftest, when run as a script
import families
from conftest import make_word_tokenizer
from traitlens.hooks import decoder_layer_paths
from traitlens.monitor import generate_with_projections, token_projections
from traitlens.steering import steer
from traitlens.vector import TraitVector

TOLERANCE = 1e-4
TIE = 1e-5  # relative gap (to the row's largest |logit|) under which two logits count as a float tie
SEED = 1234
SCALE = 2.0  # |v|: the vector given to traitlens is SCALE * u
SPECIAL = [0, 1, 2, 3]  # pad, bos, eos, unk: never generated
NEW = 4  # new tokens in the generate checks
MON_NEW = 5  # new tokens in the monitor check
# generate settings that keep the special ids out (BART-derived configs force EOS at the last step)
CLEAN = {"suppress_tokens": SPECIAL, "forced_eos_token_id": None, "forced_bos_token_id": None}

RIGHT = [families.words(5, 3), families.words(8, 20), families.words(3, 41)]  # right-padded batch
PROMPTS = [families.words(6, 11), families.words(3, 30), families.words(4, 57)]  # left-padded batch
MON_PROMPT = families.words(6, 5)

CHECKS = ("add", "pads", "add_norm", "gen", "prompt", "ablate", "mon_gen", "mon_text")


class RefError(Exception):
    """The reference cannot be computed (the model cannot run this check on text alone)."""


class Crash(Exception):
    """traitlens raised where the reference ran."""


# ---------------------------------------------------------------------------------------------- inputs


def ids_of(tokenizer, text: str) -> list[int]:
    ids = tokenizer.convert_tokens_to_ids(text.split())
    if any(i in SPECIAL for i in ids):
        raise RuntimeError(f"harness: a word of {text!r} is not in the vocabulary")
    return ids


def padded(rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``[batch, seq]``, padded with id 0 on ``side``."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[i, cols] = torch.tensor(r)
        mask[i, cols] = 1
    return ids, mask


# ------------------------------------------------------------------------------------------ reference


def _hidden(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _rebuild(out, new):
    if isinstance(out, tuple) and hasattr(out, "_fields"):  # a namedtuple (Reformer's ReformerOutput)
        return type(out)(new, *out[1:])
    if isinstance(out, tuple):
        return (new, *out[1:])
    if isinstance(out, list):
        return [new, *out[1:]]
    return new


@contextmanager
def hooked(model, path: str, edit=None, capture: list | None = None, by_pass: dict | None = None):
    """Plain hooks: a pre-hook on the model records each pass's input length; a hook on ``path`` calls
    ``edit(hidden, pass_index, pass_length)`` (a new hidden state, or None to keep it) and appends the
    (edited) hidden state to ``capture`` and stores it in ``by_pass[pass_index]`` (the last call of a
    layer that runs several times in one pass). Yields the list of pass lengths."""
    passes: list[int] = []

    def pre(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        passes.append(ids.shape[1] if ids is not None else -1)

    def post(module, args, out):
        h = _hidden(out)
        if not torch.is_tensor(h) or h.ndim != 3:
            raise RefError(
                f"layer output {type(h).__name__} {getattr(h, 'shape', '')}, not [batch, seq, hidden]"
            )
        new = edit(h, len(passes) - 1, passes[-1]) if edit is not None else None
        if capture is not None:
            capture.append((h if new is None else new).detach())
        if by_pass is not None:
            by_pass[len(passes) - 1] = (h if new is None else new).detach()
        return out if new is None else _rebuild(out, new)

    handles = [model.register_forward_pre_hook(pre, with_kwargs=True)]
    handles.append(model.get_submodule(path).register_forward_hook(post))
    try:
        yield passes
    finally:
        for h in handles:
            h.remove()


def add_at(mask: torch.Tensor, delta: torch.Tensor):
    """An edit adding ``delta`` [hidden] where ``mask`` [batch, seq] is 1 (one forward pass)."""

    def edit(h, k, length):
        if h.shape[:2] != mask.shape:
            raise RefError(f"layer output {tuple(h.shape)} does not match the batch {tuple(mask.shape)}")
        return torch.where(mask.bool().unsqueeze(-1), h + delta.to(h.dtype), h)

    return edit


def add_during_generate(prompt_mask: torch.Tensor, delta: torch.Tensor, where: str):
    """An edit for ``generate``: adds ``delta`` at the prompt's real tokens or at the generated ones."""
    batch, prompt_len = prompt_mask.shape

    def edit(h, k, length):
        if h.shape[0] != batch or h.shape[1] != length:
            raise RefError(f"layer output {tuple(h.shape)} in a pass of {length} positions, batch {batch}")
        if length == 1 and k > 0:  # a generated token fed onto the cache
            columns = torch.tensor([prompt_len + k - 1])
        elif length == prompt_len + k:  # a whole sequence: the prompt, or re-fed without a cache
            columns = torch.arange(length)
        else:
            raise RefError(f"pass {k} has {length} positions; prompt {prompt_len}: cannot place it")
        real = torch.ones(batch, length, dtype=torch.bool)  # generated tokens are all real
        in_prompt = columns < prompt_len
        real[:, in_prompt] = prompt_mask[:, columns[in_prompt]].bool()
        chosen = real & (in_prompt if where == "prompt" else ~in_prompt)
        return torch.where(chosen.unsqueeze(-1), h + delta.to(h.dtype), h)

    return edit


def ablate_at(mask: torch.Tensor, unit: torch.Tensor):
    u = unit.double()

    def edit(h, k, length):
        if h.shape[:2] != mask.shape:
            raise RefError(f"layer output {tuple(h.shape)} does not match the batch {tuple(mask.shape)}")
        x = h.double()
        removed = (x - (x @ u).unsqueeze(-1) * u).to(h.dtype)
        return torch.where(mask.bool().unsqueeze(-1), removed, h)

    return edit


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max over rows of ``|got - ref| / |ref|`` (float64; inf on a shape mismatch or a non-finite value)."""
    if tuple(got.shape) != tuple(ref.shape):
        return float("inf")
    err = (got.double() - ref.double()).norm(dim=-1) / ref.double().norm(dim=-1).clamp_min(1e-30)
    return float("inf") if not torch.isfinite(err).all() else float(err.max())


def run_ref(fn):
    try:
        return fn()
    except RefError:
        raise
    except Exception as err:
        raise RefError(families._short(err)) from err


def run_got(fn):
    try:
        return fn()
    except Exception as err:
        raise Crash(families._short(err)) from err


# --------------------------------------------------------------------------------------------- checks


class Family:
    def __init__(self, model, tokenizer, path: str, layer: int, unit: torch.Tensor, norm: float):
        self.model, self.tok, self.path, self.layer = model, tokenizer, path, layer
        self.unit, self.norm = unit, norm
        self.vec = SCALE * unit
        self.coeff = norm / SCALE
        self.right = padded([ids_of(tokenizer, t) for t in RIGHT], "right")
        self.left = padded([ids_of(tokenizer, t) for t in PROMPTS], "left")

    def forward(self, ids, mask) -> torch.Tensor:
        with torch.no_grad():
            return self.model(input_ids=ids, attention_mask=mask).logits

    # 1. addition at every real token of a right-padded batch

    def check_add(self, relative: bool) -> dict:
        ids, mask = self.right
        real = mask.bool()
        delta = 0.5 * self.norm * self.unit if relative else self.coeff * self.vec

        def reference():
            with hooked(self.model, self.path, add_at(mask, delta)):
                return self.forward(ids, mask)

        ref = run_ref(reference)
        base = self.forward(ids, mask)
        kwargs = {"coeff": 0.5, "norm": self.norm} if relative else {"coeff": self.coeff}

        def traitlens():
            with steer(self.model, self.vec, layer=self.layer, positions="all", **kwargs):
                return self.forward(ids, mask)

        got = run_got(traitlens)
        out = {"err": rel(got[real], ref[real]), "effect": rel(base[real], ref[real])}
        if relative:
            return out
        # Pads: steered by neither (their logits are never used, but differ if a pad was steered). The
        # effect is how much steering the pads too would move their logits.
        with hooked(self.model, self.path, add_at(torch.ones_like(mask), delta)):
            everywhere = self.forward(ids, mask)
        pads = {"err": rel(got[~real], ref[~real]), "effect": rel(everywhere[~real], ref[~real])}
        return out, pads

    # 2. addition at the generated or the prompt positions during generate

    def generate(self, ids, mask, new: int):
        with torch.no_grad():
            return self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                return_dict_in_generate=True, output_logits=True, **CLEAN,
            )  # fmt: skip

    def check_generate(self, where: str) -> dict:
        ids, mask = self.left
        prompt_len = ids.shape[1]
        delta = self.coeff * self.vec
        lengths: list[int] = []

        def reference():
            with hooked(self.model, self.path, add_during_generate(mask, delta, where)) as passes:
                out = self.generate(ids, mask, NEW)
            lengths.extend(passes)
            return out

        ref = run_ref(reference)
        base = run_ref(lambda: self.generate(ids, mask, NEW))

        def traitlens():
            with steer(self.model, self.vec, layer=self.layer, coeff=self.coeff, positions=where):
                return self.generate(ids, mask, NEW)

        got = run_got(traitlens)
        return compare_generations(got, ref, base, prompt_len) | {"passes": lengths}

    # 3. directional ablation

    def check_ablate(self) -> dict:
        ids, mask = self.right
        real = mask.bool()
        ref_h: list = []

        def reference():
            with hooked(self.model, self.path, ablate_at(mask, self.unit), capture=ref_h):
                return self.forward(ids, mask)

        ref = run_ref(reference)
        base = self.forward(ids, mask)
        got_h: list = []

        def traitlens():
            steering = steer(self.model, self.vec, layer=self.layer, op="ablate")
            with (
                steering,
                hooked(self.model, self.path, capture=got_h),
            ):  # added after steer's: sees its output
                return self.forward(ids, mask)

        got = run_got(traitlens)
        h = got_h[-1][real].double()
        proj = float(((h @ self.unit.double()).abs() / h.norm(dim=-1).clamp_min(1e-30)).max())
        return {
            "err": max(rel(got_h[-1][real], ref_h[-1][real]), rel(got[real], ref[real]), proj),
            "proj": proj,
            "out_err": rel(got_h[-1][real], ref_h[-1][real]),
            "logit_err": rel(got[real], ref[real]),
            "effect": rel(base[real], ref[real]),
        }

    # 4. per-token monitoring

    def check_monitor(self) -> tuple[dict, dict]:
        prompt = ids_of(self.tok, MON_PROMPT)
        ids = torch.tensor([prompt])
        steps: dict = {}

        def plain_generate():  # one step more, so that the last token is fed too (for the diagnosis)
            with hooked(self.model, self.path, by_pass=steps):
                return self.generate(ids, torch.ones_like(ids), MON_NEW + 1).sequences[0].tolist()

        plain = run_ref(plain_generate)[: len(prompt) + MON_NEW]
        vector = TraitVector(
            vector=self.vec, model="tiny", module=self.path, position="all", method="mean_diff"
        )
        kwargs = {"max_new_tokens": MON_NEW, **CLEAN}
        live = run_got(lambda: generate_with_projections(self.model, self.tok, vector, MON_PROMPT, **kwargs))
        sequence = self.tok.convert_tokens_to_ids(live.tokens)
        by_pass: dict = {}

        def reference():
            with hooked(self.model, self.path, by_pass=by_pass), torch.no_grad():
                self.model(input_ids=torch.tensor([sequence]))
            h = by_pass[0][0].float()  # [seq, hidden]
            if h.shape[0] != len(sequence):
                raise RefError(f"layer output {tuple(by_pass[0].shape)} for {len(sequence)} tokens")
            return h @ self.unit.float(), h.double().norm(dim=-1), h

        ref, norms, full = run_ref(reference)
        gen = {
            "err": _score_err(live.scores, ref, norms),
            "same_ids": sequence == plain,
            "n_generated": int(live.response.sum()),
        }
        # Diagnosis: the layer's outputs along the model's own generate (cached) path, position by position.
        cached = _generate_path(steps, len(sequence))
        if cached is not None and sequence == plain:
            gen["vs_generate_path"] = _score_err(live.scores, cached.float() @ self.unit.float(), norms)
            gen["generate_path_vs_full"] = rel(cached, full)
            gen["per_token_vs_full"] = [round(e, 9) for e in _score_errs(live.scores, ref, norms)]
            gen["per_token_vs_generate_path"] = [
                round(e, 9) for e in _score_errs(live.scores, cached.float() @ self.unit.float(), norms)
            ]
        if sequence != plain:
            gen["err"] = float("inf")
            gen["ids"] = {"monitor": sequence, "generate": plain}
        text = run_got(lambda: token_projections(self.model, self.tok, vector, " ".join(live.tokens)))
        text_ids = self.tok.convert_tokens_to_ids(text.tokens)
        if text_ids != sequence:
            return gen, {"err": float("inf"), "note": f"text re-tokenised to {text_ids}, not {sequence}"}
        return gen, {"err": _score_err(text.scores, ref, norms)}


def _generate_path(steps: dict, length: int) -> torch.Tensor | None:
    """``[seq, hidden]``: the layer output at each position as ``generate`` computed it (one pass of one
    position per token on the cache, or whole re-fed sequences without one); None if it cannot be placed."""
    rows: list[torch.Tensor] = []
    for k in sorted(steps):
        h = steps[k][0]  # [positions, hidden] of batch row 0
        if k > 0 and h.shape[0] == 1:
            rows.append(h[0])
        elif h.shape[0] >= len(rows):  # a whole sequence (the prompt, or a re-fed one without cache)
            rows = list(h)
        else:
            return None
    return torch.stack(rows[:length]) if len(rows) >= length else None


def _score_errs(got: torch.Tensor, ref: torch.Tensor, norms: torch.Tensor) -> list[float]:
    return ((got.double() - ref.double()).abs() / norms.clamp_min(1e-30)).tolist()


def _score_err(got: torch.Tensor, ref: torch.Tensor, norms: torch.Tensor) -> float:
    if got.shape != ref.shape:
        return float("inf")
    err = (got.double() - ref.double()).abs() / norms.clamp_min(1e-30)
    return float("inf") if not torch.isfinite(err).all() else float(err.max())


def compare_generations(got, ref, base, prompt_len: int) -> dict:
    """Ids and per-step raw logits of traitlens's generation vs the reference's, row by row; at the first
    differing id, whether the reference's logits have the two tokens within ``TIE`` (a float tie)."""
    new_got, new_ref = got.sequences[:, prompt_len:], ref.sequences[:, prompt_len:]
    moved = (
        int((base.sequences[:, prompt_len:] != new_ref).sum())
        if base.sequences.shape == ref.sequences.shape
        else -1
    )
    effect = max(
        (rel(b, r) for b, r in zip(base.logits, ref.logits, strict=False)), default=float("nan")
    )  # logits of the same steps (the prefixes may differ after the first moved id)
    out = {"moved": moved, "effect": effect, "ids_differ": 0, "ties": 0}
    if new_got.shape != new_ref.shape or len(got.logits) != len(ref.logits):
        return out | {"err": float("inf"), "note": f"shapes {tuple(new_got.shape)} vs {tuple(new_ref.shape)}"}
    err = 0.0
    for row in range(new_ref.shape[0]):
        for step in range(new_ref.shape[1]):
            err = max(err, rel(got.logits[step][row], ref.logits[step][row]))
            a, b = int(new_got[row, step]), int(new_ref[row, step])
            if a != b:
                logits = ref.logits[step][row].double()
                gap = float((logits[a] - logits[b]).abs() / logits.abs().max().clamp_min(1e-30))
                out["ids_differ"] += 1
                out["ties"] += gap <= TIE
                out.setdefault("first_diff", []).append(
                    {"row": row, "step": step, "got": a, "ref": b, "gap": gap}
                )
                break  # later steps continue from different prefixes
    out["err"] = err
    return out


# ----------------------------------------------------------------------------------------------- family


def cell_value(result: dict) -> float | None:
    """The number that decides a check: its error (inf for an untied differing id)."""
    if "err" not in result:
        return None
    if result.get("ids_differ", 0) > result.get("ties", 0):
        return float("inf")
    return result["err"]


def run_family(model_type: str, tokenizer) -> dict:
    result = {"family": model_type, "checks": {}}
    if model_type in families.SKIPS:
        return {**result, "status": "SKIP", "reason": families.SKIPS[model_type]}
    start = time.perf_counter()
    try:
        model = families.build(model_type, "eager")
    except Exception as err:
        return {**result, "status": "SKIP", "reason": f"build: {families._short(err)}"}
    result["class"] = type(model).__name__
    try:
        paths = decoder_layer_paths(model)
    except Exception as err:
        return {**result, "status": "CRASH", "reason": f"decoder_layer_paths: {families._short(err)}"}
    layer = len(paths) // 2
    path = paths[layer]
    result.update({"layer": layer, "path": path, "n_paths": len(paths)})
    # Probe: the layer's output on the right-padded batch (its width and typical norm), no steering.
    ids, mask = padded([ids_of(tokenizer, t) for t in RIGHT], "right")
    captured: list = []
    try:
        with hooked(model, path, capture=captured), torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    except RefError as err:
        return {
            **result,
            "status": "REF?",
            "reason": str(err),
            "traitlens": _unchecked(model, layer, ids, mask),
        }
    except Exception as err:
        return {**result, "status": "SKIP", "reason": f"forward on text alone: {families._short(err)}"}
    if not captured or captured[-1].shape[:2] != mask.shape:
        shape = tuple(captured[-1].shape) if captured else "no call"
        return {**result, "status": "REF?", "reason": f"layer output {shape}, not [batch, seq, hidden]",
                "traitlens": _unchecked(model, layer, ids, mask)}  # fmt: skip
    result["calls_per_pass"] = len(captured)
    hidden = captured[-1]
    width = hidden.shape[-1]
    norm = float(hidden[mask.bool()].double().norm(dim=-1).median())
    generator = torch.Generator().manual_seed(SEED)
    unit = torch.randn(width, generator=generator, dtype=torch.float64)
    unit = (unit / unit.norm()).float()
    fam = Family(model, tokenizer, path, layer, unit, norm)
    result["norm"] = norm
    checks = {
        "add": lambda: fam.check_add(relative=False),  # and "pads"
        "add_norm": lambda: fam.check_add(relative=True),
        "gen": lambda: fam.check_generate("generated"),
        "prompt": lambda: fam.check_generate("prompt"),
        "ablate": fam.check_ablate,
        "monitor": fam.check_monitor,
    }
    for name, check in checks.items():
        names = {"monitor": ("mon_gen", "mon_text"), "add": ("add", "pads")}.get(name, (name,))
        try:
            out = check()
        except RefError as err:
            out = [{"skip": f"reference: {err}"}] * len(names)
        except Crash as err:
            out = [{"crash": str(err), "traceback": traceback.format_exc(limit=-4)}] * len(names)
        except families.FamilyTimeout:
            raise
        except Exception as err:  # a bug of this script, or something unexpected
            out = [{"harness": families._short(err), "traceback": traceback.format_exc(limit=-4)}] * len(
                names
            )
        if isinstance(out, dict):
            out = [out]
        for key, value in zip(names, out, strict=True):
            result["checks"][key] = value
    result["seconds"] = round(time.perf_counter() - start, 2)
    result["status"] = _status(result["checks"])
    return result


def _unchecked(model, layer: int, ids, mask) -> str:
    """What traitlens does where no reference can be read: steering with positions "all" and "prompt"."""
    outcomes = []
    for positions in ("all", "prompt"):
        try:
            with steer(model, torch.ones(_width(model)), layer=layer, positions=positions), torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
            outcomes.append(f"{positions}: ran without error (unchecked)")
        except Exception as err:
            outcomes.append(f"{positions}: {families._short(err)}")
    return "; ".join(outcomes)


def _width(model) -> int:
    from traitlens.hooks import residual_width

    return residual_width(model) or 64


def explained(c: dict) -> bool:
    """A monitor error that the model's own generate path explains: traitlens reads what ``generate``
    computed, which is not what one forward pass over the same ids computes."""
    return (
        c.get("vs_generate_path", float("inf")) <= TOLERANCE and c.get("generate_path_vs_full", 0) > TOLERANCE
    )


def _status(checks: dict) -> str:
    values = [cell_value(c) for c in checks.values()]
    failing = [
        c for c, v in zip(checks.values(), values, strict=True) if v is not None and not v <= TOLERANCE
    ]
    if failing and all(explained(c) for c in failing):
        return "MODEL"
    if failing:
        return "WRONG"
    if any("crash" in c or "harness" in c for c in checks.values()):
        return "CRASH"
    if all(v is None for v in values):
        return "SKIP"
    return "OK"


# ------------------------------------------------------------------------------------------------ report


def cell(c: dict | None) -> str:
    if c is None:
        return "-"
    if "crash" in c:
        return "crash"
    if "harness" in c:
        return "harness"
    if "skip" in c:
        return "skip"
    v = cell_value(c)
    text = f"{c['err']:.1e}" if c["err"] != float("inf") else "inf"
    if explained(c):
        text += "m"
    elif "vs_generate_path" in c and v is not None and not v <= TOLERANCE:
        text += f"/g{c['vs_generate_path']:.0e}"
    if c.get("ids_differ"):
        text = f"ids{c['ids_differ']}" + ("t" if c["ties"] == c["ids_differ"] else "") + f"/{text}"
    return text if v is not None else "-"


def row(r: dict) -> str:
    cells = " ".join(f"{cell(r['checks'].get(k)):>11}" for k in CHECKS)
    note = r.get("reason") or next(
        (c.get("crash") or c.get("harness") or c.get("skip") for c in r["checks"].values()
         if c.get("crash") or c.get("harness") or c.get("skip")), ""
    )  # fmt: skip
    if r.get("traitlens"):
        note = f"{note}; traitlens {r['traitlens']}"
    return f"{r['family']:<26} {cells}  {r['status']:<5} {(note or '')[:160]}"


def header() -> str:
    return f"{'family':<26} " + " ".join(f"{k:>11}" for k in CHECKS) + "  status note"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", help="comma-separated model types (default: all causal-LM types)")
    parser.add_argument("--out", default="runs/families_steering.json", help="JSON file")
    args = parser.parse_args()
    names = families.script_families(parser, args.families)
    tokenizer = make_word_tokenizer()
    results = []
    start = time.perf_counter()
    print(header(), flush=True)
    for family in names:
        r = families.timed(
            lambda family=family: run_family(family, tokenizer), {"family": family, "checks": {}}
        )
        results.append(r)
        print(row(r), flush=True)
    elapsed = time.perf_counter() - start
    weak = [
        f"{r['family']}:{k}"
        for r in results
        for k, c in r["checks"].items()
        if isinstance(c.get("effect"), float) and c["effect"] < 1e-3
    ]
    if weak:
        print(
            f"steering barely moves the logits (effect < 1e-3; the check has little power): {', '.join(weak)}"
        )
    families.write_results(
        results, elapsed, ("OK", "MODEL", "WRONG", "CRASH", "REF?", "SKIP"), "families", args.out
    )


if __name__ == "__main__":
    main()
