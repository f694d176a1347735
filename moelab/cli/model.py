"""`moelab params`, `moelab presets` and `moelab convert`: a model's size, the presets, format conversion."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moelab.errors import MoelabError
from moelab.fileio import write_atomic


def register(sub, formatter) -> None:
    p = sub.add_parser(
        "params", help="total and active parameter counts of a preset or config",
        formatter_class=formatter,
        description="Count total and active (per token) parameters on the meta device (no memory).",
        epilog="example:\n  moelab params mixtral-8x7b\n  moelab params my_config.yaml --json\n"
               "  moelab params deepseek-v3 --ep 64 --dispatch-bytes 1   # all-to-all bytes per token vs FLOPs")
    p.add_argument("source", help="preset name (see `moelab presets`) or a moelab config file")
    p.add_argument("--ep", type=int, help="also size the all-to-all traffic of expert parallelism over this many ranks")
    p.add_argument("--dispatch-bytes", type=int, default=2, help="bytes per dispatched value (2: bf16, 1: fp8)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--out", help="also write result.json into this directory")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser(
        "convert", help="convert a model between moelab and Hugging Face formats", formatter_class=formatter,
        description="Load SRC (a moelab model/checkpoint/run directory or an HF model directory) and write it to "
                    "DST as an HF directory (config.json + model.safetensors + tokenizer) or a moelab directory.",
        epilog="example:\n  moelab convert ./Mixtral-tiny ./mixtral-moelab --to moelab\n"
               "  moelab convert runs/tiny ./tiny-hf --to hf")
    p.add_argument("src", help="model directory to read")
    p.add_argument("dst", help="directory to write (a new one, or one moelab wrote before: replaced atomically)")
    p.add_argument("--to", required=True, choices=("hf", "moelab"), help="output format")
    p.add_argument("--force", action="store_true",
                   help="replace DST even when it holds files moelab did not write (they are deleted)")
    p.add_argument("--family", help="HF model_type to export to (default: the source family, else the closest)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("presets", help="list the model presets", formatter_class=formatter,
                       epilog="example:\n  moelab presets")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_presets)


def _resolve_model_config(source: str):
    """A preset name, or a moelab config file (.yaml/.yml/.json)."""
    from moelab.config import load_config
    from moelab.presets import PRESETS, get_preset

    path = Path(source)
    if path.is_dir() and (path / "config.yaml").is_file():
        return load_config(path / "config.yaml")
    hf_json = path / "config.json" if path.is_dir() else path
    if hf_json.suffix == ".json" and hf_json.is_file():  # an HF config.json counts on the meta device too
        from moelab.interop.hf import hf_config_to_model_config, is_hf_config

        try:
            data = json.loads(hf_json.read_text())
        except json.JSONDecodeError as e:
            raise MoelabError(f"{hf_json}: not valid JSON ({e})") from e
        if is_hf_config(data):
            return hf_config_to_model_config(data, counting_only=True, where=str(hf_json))
    if path.suffix in (".yaml", ".yml", ".json") or path.exists():
        return load_config(path)
    if source.lower().replace("_", "-") in PRESETS:
        return get_preset(source)
    raise MoelabError(
        f"SOURCE {source!r} is neither a preset ({', '.join(PRESETS)}) nor an existing config file")


def cmd_params(args: argparse.Namespace) -> int:
    from moelab.params import COMPONENTS, count_params, human

    cfg = _resolve_model_config(args.source)
    count = count_params(cfg)
    data = {"source": args.source, **count.to_dict(), "attention": cfg.attention_kind(),
            "kv_cache_values_per_token": cfg.kv_cache_values_per_token(),
            "kv_cache_bytes_per_token": {"bf16": cfg.kv_cache_bytes_per_token(2), "fp32": cfg.kv_cache_bytes_per_token(4)}}
    if cfg.moe is not None:
        data["balancing"] = cfg.moe.router.balancing()
    if args.ep:
        from moelab.distributed.sizing import bandwidth_needed, expert_parallel_traffic

        if cfg.moe is None:
            raise MoelabError(f"--ep: {args.source} has no MoE layers")
        t = expert_parallel_traffic(cfg, args.ep, dispatch_bytes=args.dispatch_bytes)
        t["bandwidth_at_400_tflops"] = bandwidth_needed(t, 400)
        data["expert_parallel"] = t
    if args.out:
        out = Path(args.out)  # checked and marked by moelab.cli.main (--force)
        write_atomic(out / "result.json", json.dumps(data, indent=2) + "\n")
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"{args.source}: {human(count.total_params)} total / {human(count.active_params)} active parameters per token")
    print(f"  {'component':<16}{'total':>18}{'active':>18}")
    for c in COMPONENTS:
        if count.breakdown[c]:
            print(f"  {c:<16}{count.breakdown[c]:>18,}{count.active_breakdown[c]:>18,}")
    print(f"  {'all':<16}{count.total_params:>18,}{count.active_params:>18,}")
    if count.active_params_paper != count.active_params:
        print(f"active, paper convention: {human(count.active_params_paper)} ({count.active_params_paper:,}): a tied "
              "embedding counted again as the output head, only the K chosen experts (moelab's own figure above "
              "counts the embedding once and every AoE W_down, which every token runs)")
    if count.aoe_cache_bytes_per_token:
        print(f"AoE activation cache (x W_down of every expert, all MoE layers): {count.aoe_cache_bytes_per_token:,} "
              "bytes per token "
              "per forward at the parameters' dtype (training also keeps each assignment's gathered copy)")
    if count.mtp_params:
        print(f"MTP modules (not in the totals above; embedding and head shared): {human(count.mtp_params)} "
              f"({count.mtp_params:,}), {human(count.mtp_active_params)} active")
    kv = data["kv_cache_bytes_per_token"]
    print(f"KV cache ({cfg.attention_kind()}): {cfg.kv_cache_values_per_token():,} values per token over "
          f"{cfg.num_layers} layers = {kv['bf16']:,} bytes in bf16 ({human(kv['bf16'] * 1024)}B per 1K tokens), "
          f"{kv['fp32']:,} in fp32")
    if cfg.moe is not None:
        print(f"router {cfg.moe.router.type}, balancing in training: {data['balancing']['summary']}")
    if args.ep:
        t = data["expert_parallel"]
        print(f"expert parallelism over {args.ep} ranks ({args.dispatch_bytes}-byte dispatch, 2-byte combine and "
              f"gradients): {t['rows_off_rank_per_layer']:.2f} rows of {t['d_model']} values leave a token's rank per "
              f"MoE layer; {human(t['forward_bytes_per_token'])}B per token forward, "
              f"{human(t['train_bytes_per_token'])}B per token per training step over {t['moe_layers']} MoE layers, "
              f"against {t['train_flops_per_token'] / 1e9:.1f} GFLOP: {t['train_bytes_per_flop'] * 1e6:.1f} bytes per "
              f"MFLOP; at 400 TFLOP/s achieved per device that is {t['bandwidth_at_400_tflops'] / 1e9:.1f} GB/s per "
              "device (docs/distributed.md)")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from moelab.checkpoint.model_files import save_model
    from moelab.interop.hf import export_hf
    from moelab.checkpoint.atomic import check_replaceable
    from moelab.loading import load

    if args.family and args.to != "hf":
        raise MoelabError("--family applies only with --to hf")
    check_replaceable(Path(args.dst), args.force, fix="choose another DST, or pass --force to replace it",
                      kind="hf-export" if args.to == "hf" else "moelab-model")
    model = load(args.src)
    if args.to == "hf":
        out = export_hf(model, args.dst, family=args.family, force=args.force)
        family = json.loads((out / "config.json").read_text())["model_type"]
        print(f"wrote {out} (Hugging Face {family})")
        return 0
    tokenizer = Path(getattr(model, "source_dir", "") or "") / "tokenizer.json"
    out = save_model(model, args.dst, extra_files={"tokenizer.json": tokenizer} if tokenizer.is_file() else None,
                     force=args.force)
    print(f"wrote {out} (moelab config.yaml + model.safetensors)")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from moelab.params import count_params, human
    from moelab.presets import PRESETS, PUBLISHED

    rows = []
    for name in PRESETS:
        c = count_params(PRESETS[name]())
        pub = PUBLISHED.get(name)
        rows.append({"name": name, "total_params": c.total_params, "active_params": c.active_params,
                     "active_params_paper": c.active_params_paper,
                     "published": None if pub is None else {"total": pub.total, "active": pub.active,
                                                             "active_convention": pub.active_convention,
                                                             "source": pub.source}})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        pub = r["published"]
        ref = f"  (published {pub['total']} / {pub['active'] or 'n/a'})" if pub else ""
        if pub and pub["active_convention"] == "paper":
            ref += f"; {human(r['active_params_paper'])} active in the paper's convention (see `moelab params`)"
        print(f"{r['name']:<20}{human(r['total_params']):>8} total {human(r['active_params']):>8} active{ref}")
    return 0
