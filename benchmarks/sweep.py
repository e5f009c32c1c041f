"""The zoo sweep (issue 27): one model of every timm family, every transformers model type that builds
from a shrunk config, and every torchvision model, each converted with ``gain="none"`` and its norms
kept (random weights, with what init leaves zero randomized as the faithful tests do), then judged
against ``tests/faithful_reference.py``: the original in float64 with every dot
product (products with a weight included) replaced by the cosine of what it receives.

    python benchmarks/sweep.py                                  # everything (hours on 2 cores)
    python benchmarks/sweep.py --source torchvision --limit 20  # a sample
    python benchmarks/sweep.py --only resnet18 BertModel        # by name
    python benchmarks/sweep.py --out docs/sweep_results.jsonl   # one JSON line per model; resumes
    until python benchmarks/sweep.py --out r.jsonl; [ $? -le 1 ]; do :; done  # rerun past a killed process

Each model ends in one status:

- ``faithful``: the converted model (float32) matches the reference within 1e-4 of the output's
  largest value; ``partial``: the same, with layers the report lists as skipped left as dot products
  in the reference;
- ``precision``: it misses in float32 by more, but run in float64 it matches within 1e-5, or the judge's own
  float32 run (each cosine exact, then rounded to float32) misses by as much: the network amplifies float32
  rounding (a router's top-k, a detector's query selection);
- ``WRONG``: it differs from the reference: a silent wrong conversion, the worst outcome;
- ``failed``: cosconvert raised, or the converted model does not run: the row holds the one line;
- ``harness``: the original cannot be built or run here, or is random in its forward (two runs of it
  differ), so no reference can judge it (a harness skip, not cosconvert's result).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import inspect
import json
import signal
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from faithful_reference import CosineReference, leave_plain, reference_outputs  # noqa: E402
from test_faithful import leaves, liven  # noqa: E402

import cosconvert  # noqa: E402
from cosconvert.errors import first_line  # noqa: E402

REL_TOL, F64_TOL = 1e-4, 1e-5  # float64 runs of models with float32 constants (anchors) agree to about 1e-6
SIZE_WORDS = ("atto", "femto", "pico", "nano", "tiny", "xxs", "xs", "mini", "small", "s", "b0", "050", "100")


class Harness(Exception):
    """The original cannot be built or run here: not cosconvert's result."""


@contextlib.contextmanager
def deadline(seconds: int):
    def expire(*_):
        raise TimeoutError(f"over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# -- the cases: name -> builder of (model, args, kwargs) ---------------------------------------------
def timm_cases() -> dict:
    """The smallest-named model of each timm module (family)."""
    import timm

    def size_rank(name: str) -> tuple:
        parts = name.replace("-", "_").split("_")
        return (min((SIZE_WORDS.index(p) for p in parts if p in SIZE_WORDS), default=len(SIZE_WORDS)), len(name))

    cases = {}
    for module in timm.list_modules():
        names = sorted(timm.list_models(module=module), key=size_rank)
        if names:
            cases[names[0]] = lambda name=names[0]: _timm(name)
    return cases


def _timm(name: str):
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=10)
    c, h, w = model.pretrained_cfg.get("input_size", (3, 224, 224))
    return model, (torch.randn(2, c, h, w),), {}


SHRINK = {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "intermediate_size": 64, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "num_layers": 2, "n_layer": 2,
    "n_head": 4, "n_embd": 32, "d_ff": 64, "ffn_dim": 64, "projection_dim": 32, "head_dim": 8, "num_experts": 4,
    "num_local_experts": 4, "moe_intermediate_size": 32, "num_experts_per_tok": 2,
}  # fmt: skip
# Tried first, with every kind of layer of a config's layer_types kept (else SHRINK alone): the layers and
# experts that two shrunk layers would otherwise lack.
SHRINK_MORE = {
    # multi-head latent attention (DeepSeek-V3): its own head sizes, or the rotary's mismatch head_dim
    "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8, "kv_lora_rank": 16, "q_lora_rank": 32,
    "n_routed_experts": 8, "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1,
    # hybrid models (Jamba): one attention layer among the 2, and one with experts
    "attn_layer_period": 2, "attn_layer_offset": 0, "expert_layer_period": 2, "expert_layer_offset": 1,
    "encoder_sparse_step": 2, "decoder_sparse_step": 2,  # NLLB-MoE: its second layers sparse
}  # fmt: skip


def _shrunk_fields(config, more: bool = True) -> dict:
    """The keyword arguments of a shrunk ``config``: its sizes cut down (``more``: SHRINK_MORE too, and
    every kind of layer of ``layer_types`` kept), its sub-configs (vision_config, text_config, and
    theirs) as dicts of their own fields, shrunk the same way."""
    fields = config.to_dict()
    kwargs = {k: v for k, v in (SHRINK | SHRINK_MORE if more else SHRINK).items() if isinstance(fields.get(k), int)}
    if "kv_lora_rank" in kwargs and "num_key_value_heads" in kwargs:  # latent attention expands keys to every head
        kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
    layers = kwargs.get("num_hidden_layers")
    if more and layers and isinstance(fields.get("layer_types"), list):  # every kind of layer (Qwen3-Next)
        kinds = list(dict.fromkeys(fields["layer_types"]))
        kwargs["layer_types"] = [kinds[i % len(kinds)] for i in range(max(layers, len(kinds)))]
        kwargs["num_hidden_layers"] = len(kwargs["layer_types"])
    for key in getattr(type(config), "sub_configs", {}):
        sub = getattr(config, key, None)
        if hasattr(sub, "to_dict"):
            kwargs[key] = {**sub.to_dict(), **_shrunk_fields(sub, more)}
    return kwargs


def transformers_cases() -> dict:
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    cases = {}
    for model_type, class_name in MODEL_MAPPING_NAMES.items():
        class_name = class_name[0] if isinstance(class_name, (tuple, list)) else class_name
        config_name = CONFIG_MAPPING_NAMES.get(model_type)
        if config_name and hasattr(transformers, class_name) and hasattr(transformers, config_name):
            cases[class_name] = lambda c=class_name, k=config_name: _transformers(c, k)
    return cases


def _transformers(class_name: str, config_name: str):
    import transformers

    config_class, model_class = getattr(transformers, config_name), getattr(transformers, class_name)
    for more in (True, False):  # shrunk (derived fields follow the keywords); else its defaults
        try:
            config = config_class(**_shrunk_fields(config_class(), more))
            model = model_class(config)
            break
        except Exception:  # noqa: BLE001 - a config that does not take these sizes
            continue
    else:
        config = config_class()
        model = model_class(config)
    params = inspect.signature(model.forward).parameters
    sub = lambda key, default: getattr(config, key, None) or getattr(getattr(config, "vision_config", None), key, None) or default  # noqa: E731
    kwargs = {}
    if "input_ids" in params:
        vocab = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", 100)
        kwargs["input_ids"] = torch.randint(0, min(vocab, 1000), (2, 8))
        if "decoder_input_ids" in params and getattr(config, "is_encoder_decoder", False):
            kwargs["decoder_input_ids"] = kwargs["input_ids"]
    if "pixel_values" in params:
        size = sub("image_size", 224)
        size = size if isinstance(size, int) else size[0]
        kwargs["pixel_values"] = torch.randn(2, sub("num_channels", 3), size, size)
    if "input_values" in params and not kwargs:
        kwargs["input_values"] = torch.randn(2, 4000)
    if "input_features" in params and not kwargs:
        frames = 2 * getattr(config, "max_source_positions", 50)
        kwargs["input_features"] = torch.randn(2, getattr(config, "num_mel_bins", 80), frames)
    if "noise_sequence" in params and "input_features" in kwargs:  # UnivNet: its noise given, not drawn
        frames = kwargs["input_features"].shape[1]
        kwargs["noise_sequence"] = torch.randn(2, frames, getattr(config, "model_in_channels", 64))
    if not kwargs:
        raise Harness(f"no input this harness knows for {class_name}.forward")
    return model, (), kwargs


def torchvision_cases() -> dict:
    import torchvision
    import torchvision.models as tm

    kinds = {
        tm.detection: "detection", tm.segmentation: "segmentation", tm.video: "video",
        tm.optical_flow: "optical_flow", tm.quantization: "quantized",
    }  # fmt: skip
    def case(name: str, kind: str):
        build = functools.partial(_torchvision, name, kind)
        # Some (regnet) cannot be built on the meta device; their weights' metadata says their size.
        build.declared_params = lambda: torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"]
        return build

    cases = {}
    for module, kind in kinds.items():
        for name in torchvision.models.list_models(module=module):
            cases[f"{kind}/{name}"] = case(name, kind)
    for name in torchvision.models.list_models(module=tm):
        if f"quantized/{name}" not in cases:
            cases[name] = case(name, "classification")
    return cases


def _torchvision(name: str, kind: str):
    import torchvision

    extra = {"quantize": False} if kind == "quantized" else {}
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, **extra) if kind in (
        "detection", "segmentation") else torchvision.models.get_model(name, weights=None, **extra)  # fmt: skip
    if kind == "detection":  # the backbone and its feature pyramid: the heads' outputs are data-dependent lists
        size = 300 if name.startswith("ssd300") else 128  # SSD's extra layers shrink a smaller input to nothing
        return model.backbone, (torch.randn(1, 3, size, size),), {}
    if kind == "segmentation":
        return model, (torch.randn(2, 3, 64, 64),), {}
    if kind == "video":
        frames, size = (16, 224) if name.startswith(("mvit", "s3d")) else (4, 64)
        return model, (torch.randn(1, 3, frames, size, size),), {}
    if kind == "optical_flow":
        return model, (torch.randn(1, 3, 128, 128), torch.randn(1, 3, 128, 128)), {"num_flow_updates": 2}
    size = 299 if name == "inception_v3" else 224
    return model, (torch.randn(2, 3, size, size),), {}


SOURCES = {"timm": timm_cases, "transformers": transformers_cases, "torchvision": torchvision_cases}


# -- judging one model ---------------------------------------------------------------------------------
def _rel(out, ref) -> float:
    outs, refs = leaves(out), leaves(ref)
    if [t.shape for t in outs] != [t.shape for t in refs] or not refs:
        return float("inf")
    return max(float((o.double() - r).abs().max() / r.abs().max().clamp_min(1e-30)) for o, r in zip(outs, refs))


def judge(build, max_params: int) -> dict:
    """One model's row: status, relative error, layer counts, checks and, for a failure, its one line."""
    row: dict = {}
    try:  # counted on the meta device first: a default config can be far too big to build here
        with torch.device("meta"):
            params = sum(p.numel() for p in build()[0].parameters())
    except Exception as err:  # noqa: BLE001 - not sized, so not built: it could exhaust the memory
        try:
            params = build.declared_params()
        except Exception:  # noqa: BLE001 - no declared size either
            why = first_line(err, with_type=True)[:200]
            return {"status": "harness", "error": f"not built: it cannot be sized on the meta device ({why})"}
    if params > max_params:
        return {"params": params, "status": "harness", "error": f"{params / 1e6:.0f}M parameters: over this sweep's limit"}
    try:
        model, args, kwargs = build()
        model = liven(model).eval()  # zero-initialized heads and layer scales would hide layers from the judge
        row["params"] = sum(p.numel() for p in model.parameters())
        if row["params"] > max_params:
            raise Harness(f"{row['params'] / 1e6:.0f}M parameters: over this sweep's limit")
        with torch.no_grad():
            first, again = model(*args, **kwargs), model(*args, **kwargs)
        if _rel(again, first) > REL_TOL:  # random masking, noise inputs, sampled durations
            raise Harness(f"the original is random in its forward: two runs differ by {_rel(again, first):.1e}")
    except Exception as err:  # noqa: BLE001 - the original itself does not build or run here
        return {**row, "status": "harness", "error": first_line(err, with_type=True)[:200]}
    try:
        converted = cosconvert.convert(model, gain="none").eval()
        report = converted.cosine_report
        with torch.no_grad():
            out = converted(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - cosconvert's failure: its one line
        frame = traceback.extract_tb(err.__traceback__)[-1]
        return {**row, "status": "failed", "error": first_line(err, with_type=True)[:200], "at": f"{Path(frame.filename).name}:{frame.lineno}"}
    names = {n for n, _ in model.named_modules()}
    skipped = [r["name"] for r in report.skipped if r["name"] in names]
    experts = sum("experts" in r["name"].split(".") for r in report.converted)  # a mixture of experts' calls
    row.update(converted=len(report.converted), experts=experts, skipped=len(report.skipped),
               fallbacks=len(report.fallbacks), cosine_check=report.checks.get("cosine check", ""))  # fmt: skip
    try:
        ref, mode = reference_outputs(model, *args, skip=skipped, **kwargs)
    except Exception as err:  # noqa: BLE001 - the judge cannot run the original in float64
        return {**row, "status": "harness", "error": f"reference: {first_line(err, with_type=True)[:200]}"}
    if not all(torch.isfinite(t).all() for t in leaves(ref)):
        return {**row, "status": "harness", "error": "reference: the original run in float64 gives NaN or inf"}
    row["rel"] = _rel(out, ref)
    row["reference_calls"] = sum(mode.calls.values())
    row["unjudged_products"] = mode.weight_products[:3]
    if row["rel"] <= REL_TOL:
        row["status"] = "partial" if report.skipped else "faithful"
        return row
    try:  # the judge's own float32 run: each cosine exact, then rounded to float32; skipped layers plain, as in ref
        judge, twin = CosineReference(), copy.deepcopy(model)
        for name in skipped:
            leave_plain(twin.get_submodule(name), judge)
        with torch.no_grad(), judge:
            row["judge_f32"] = _rel(twin(*args, **kwargs), ref)
    except Exception:  # noqa: BLE001 - no float32 judge: the float64 rerun decides alone
        row["judge_f32"] = None
    try:
        with torch.no_grad():
            row["rel_float64"] = _rel(converted.double()(*_double(args), **_double(kwargs)), ref)
    except Exception as err:  # noqa: BLE001 - the float32 judge alone decides
        row["rel_float64"], row["error"] = None, f"its float64 rerun fails: {first_line(err, with_type=True)[:200]}"
    rounding = row["rel_float64"] is not None and row["rel_float64"] <= F64_TOL
    # the original with exact cosines, rounded to float32, misses by as much: the network amplifies rounding
    rounding |= row["judge_f32"] is not None and row["rel"] <= 2 * row["judge_f32"] + REL_TOL
    row["status"] = "precision" if rounding else "WRONG"
    return row


def _double(tree):
    return torch.utils._pytree.tree_map(lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, tree)  # noqa: E501


def markdown(rows: list[dict]) -> str:
    """The results as docs/sweep.md's tables: counts by source and status, then every row that is not faithful."""
    statuses = ["faithful", "partial", "precision", "WRONG", "failed", "harness"]
    counts = Counter((r["source"], r["status"]) for r in rows)
    lines = ["| source | models | " + " | ".join(statuses) + " |", "|---|---|" + "---|" * len(statuses)]
    for source in sorted({r["source"] for r in rows}):
        total = sum(n for (s, _), n in counts.items() if s == source)
        lines.append(f"| {source} | {total} | " + " | ".join(str(counts[(source, st)]) for st in statuses) + " |")
    lines += ["", "| source | model | status | relative error (float32, float64, the judge's own float32) | reason |", "|---|---|---|---|---|"]
    for r in rows:
        if r["status"] in ("precision", "WRONG", "failed"):
            fmt = lambda key: "-" if r.get(key) is None else f"{r[key]:.1e}"  # noqa: E731
            rel = f"{fmt('rel')}, {fmt('rel_float64')}, {fmt('judge_f32')}" if "rel" in r else ""
            lines.append(f"| {r['source']} | {r['model']} | {r['status']} | {rel} | {r.get('error', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="timm,transformers,torchvision")
    parser.add_argument("--only", nargs="*", help="model names (as in the table)")
    parser.add_argument("--limit", type=int, help="the first N models of each source")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per model")
    parser.add_argument("--max-params", type=float, default=150e6)
    parser.add_argument("--out", help="append one JSON line per model here; models already in it are skipped")
    parser.add_argument("--markdown", help="print the tables of this results file (JSON lines) and exit")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown([json.loads(line) for line in Path(args.markdown).read_text().splitlines() if line.strip()]))
        return 0
    done = set()
    if args.out and Path(args.out).exists():
        rows_done = [json.loads(line) for line in Path(args.out).read_text().splitlines() if line.strip()]
        done = {(r["source"], r["model"]) for r in rows_done}  # timm and torchvision share names (resnet18)
    rows = []
    for source in args.source.split(","):
        cases = SOURCES[source]()
        names = [n for n in cases if not args.only or n in args.only][: args.limit]
        for name in names:
            if (source, name) in done:
                continue
            if args.out:  # a model that kills the process (out of memory) is recorded as such on the rerun
                started = Path(args.out + ".started")
                if started.exists() and started.read_text() == name:
                    row = {"source": source, "model": name, "status": "harness", "error": "killed the sweep's process (out of memory?)"}  # noqa: E501
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    continue
                started.write_text(name)
            torch.manual_seed(0)
            start = time.time()
            try:
                with deadline(args.timeout):
                    row = judge(cases[name], int(args.max_params))
            except TimeoutError as err:
                row = {"status": "harness", "error": f"timeout: {err}"}
            except Exception as err:  # noqa: BLE001 - the harness's own failure: recorded, the sweep goes on
                row = {"status": "harness", "error": f"harness: {first_line(err, with_type=True)[:200]}"}
            row = {"source": source, "model": name, **row, "seconds": round(time.time() - start, 1)}
            rows.append(row)
            print(f"{source:12} {name:48} {row['status']:9} {row.get('rel', ''):<10.3g} {row.get('error', '')[:90]}"
                  if isinstance(row.get("rel"), float) else
                  f"{source:12} {name:48} {row['status']:9} {'':10} {row.get('error', '')[:90]}", flush=True)  # fmt: skip
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    counts = Counter((r["source"], r["status"]) for r in rows)
    for source in sorted({s for s, _ in counts}):
        print(source + ": " + ", ".join(f"{status} {n}" for (s, status), n in sorted(counts.items()) if s == source))
    return 1 if any(r["status"] == "WRONG" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
