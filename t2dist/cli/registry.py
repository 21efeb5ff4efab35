"""``t2dist registry …`` and ``t2dist export``: the commands around published experts."""
from __future__ import annotations

import argparse
import json
import sys

REGISTRY_HELP = "registry URL: a directory or fsspec URL such as s3://bucket/prefix (default $T2DIST_REGISTRY or ./registry)"
COMMANDS = {
    "registry": "publish, list, show, promote, verify and delete experts in a registry (local or s3://…)",
    "export": "write one expert as a merged Hugging Face checkpoint (W' baked in) or as a PEFT LoRA adapter",
}


def add_registry_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", metavar="URL", help=REGISTRY_HELP)


def add_parsers(sub) -> None:
    p = sub.add_parser("registry", help=COMMANDS["registry"], description=COMMANDS["registry"])
    rsub = p.add_subparsers(dest="registry_command", metavar="ACTION", required=True)
    a = rsub.add_parser("publish", help="publish an expert directory trained elsewhere as a new version")
    a.add_argument("path", help="expert directory (z.safetensors + card.json)")
    a.add_argument("--name", help="expert name (default: the card's name)")
    a.add_argument("--alias", help="also point this alias (e.g. champion) at the new version")
    add_registry_arg(a)
    a = rsub.add_parser("ls", help="list experts and versions")
    a.add_argument("name", nargs="?")
    add_registry_arg(a)
    a = rsub.add_parser("show", help="print the card of NAME[@VERSION|:ALIAS]")
    a.add_argument("ref")
    add_registry_arg(a)
    a = rsub.add_parser("promote", help="point an alias (default champion) at NAME@VERSION")
    a.add_argument("ref")
    a.add_argument("--alias", default="champion")
    add_registry_arg(a)
    a = rsub.add_parser("verify", help="check the sha256 of every version's z file (or one)")
    a.add_argument("ref", nargs="?")
    add_registry_arg(a)
    a = rsub.add_parser("rm", help="delete one version (refused while an alias points at it, unless --force)")
    a.add_argument("ref")
    a.add_argument("--force", action="store_true", help="also remove aliases pointing at it")
    add_registry_arg(a)

    p = sub.add_parser("export", help=COMMANDS["export"], description=COMMANDS["export"])
    p.add_argument("--expert", required=True, help="expert directory or NAME[@VERSION|:ALIAS] in --registry")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--format", choices=["merged", "lora"], default="merged",
                   help="merged: a full checkpoint with W' baked in (default); lora: a PEFT LoRA adapter for the base "
                        "model (vLLM, SGLang, peft...; see docs/lora.md)")
    p.add_argument("--rank", type=int, metavar="K",
                   help="--format lora: the adapter's rank K (default: the expert's full rank, capped at 512, "
                        "vLLM's largest max_lora_rank); below the full rank the K largest changes are kept")
    p.add_argument("--model", help="base model (model.path); default: the one named in the expert's card")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="dtype of the saved weights")
    add_registry_arg(p)
    p.add_argument("--config", help="YAML run config (defaults when omitted)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")


def _registry(args, create: bool = False):
    from t2dist.registry import Registry, default_registry_url

    return Registry(args.registry or default_registry_url(), create=create)


def cmd_registry(args) -> int:
    action = args.registry_command
    if action == "publish":
        reg = _registry(args, create=True)
        ref = reg.publish_dir(args.path, name=args.name)
        print(f"published {ref} to {reg.url}")
        if args.alias:
            name, version = ref.split("@")
            reg.set_alias(name, args.alias, int(version), reason="t2dist registry publish --alias")
            print(f"{name}:{args.alias} -> @{version}")
        return 0
    reg = _registry(args)
    if action == "ls":
        rows = reg.list(args.name)
        if not rows:
            print(f"no experts in {reg.url}")
            return 0
        table = [(f"{r['name']}@{r['version']}", str(r["task"]), r["kind"],
                  f"{acc:.3f}" if isinstance(acc := r["metrics"].get("test_accuracy"), (int, float)) else "-",
                  ",".join(r["aliases"]) or "-", r["created"]) for r in rows]
        head = ("expert", "task", "kind", "test acc", "aliases", "created")
        widths = [max(len(row[i]) for row in (head, *table)) for i in range(len(head))]
        for row in (head, *table):  # columns as wide as their longest entry (dispatch_real, sentiment@12, ...)
            print("  ".join(c.rjust(w) if i == 3 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip())
        return 0
    if action == "show":
        card = dict(reg.card(args.ref))
        history = card.pop("history", None)
        print(json.dumps(card, indent=2))
        if history:
            print(f"history: {len(history)} steps (in card.json)")
        return 0
    if action == "promote":
        name, version = reg.resolve(args.ref)
        reg.set_alias(name, args.alias, version, reason="t2dist registry promote")
        print(f"{name}:{args.alias} -> @{version}")
        return 0
    if action == "verify":
        results = reg.verify(args.ref)
        for r in results:
            print(f"{'ok ' if r['ok'] else 'BAD'} {r['ref']}: {r['detail']}")
        bad = sum(not r["ok"] for r in results)
        print(f"{len(results) - bad}/{len(results)} versions verified")
        return 1 if bad else 0
    if action == "rm":
        print(f"deleted {reg.delete(args.ref, force=args.force)}")
        return 0
    raise AssertionError(action)


def cmd_export(args) -> int:
    from t2dist.cli.common import config_from_args, policy_overrides_from_card
    from t2dist.experts.export import check_export_target
    from t2dist.experts.lora import LoRAExportError, check_base_has_targets, check_rank
    from t2dist.registry import read_expert_ref

    if args.rank is not None:  # every check that needs no model comes first
        if args.format != "lora":
            raise LoRAExportError(f"--rank is for --format lora (got --format {args.format})")
        check_rank(args.rank)
    check_export_target(args.out)
    expert = read_expert_ref(args.expert, args.registry)  # fails on a bad reference before loading a model
    extra = {"model.path": args.model or expert.card.get("base_model") or None}
    extra.update(policy_overrides_from_card(expert.card, args.overrides))
    cfg = config_from_args(args, extra)
    check_base_has_targets(cfg.model.path, expert.card["targets"], cfg.model.cache_dir, source=f"expert {args.expert}")
    return (_export_lora if args.format == "lora" else _export_merged)(args, cfg, expert)


def _load_checked(args, cfg, expert):
    from t2dist.experts.expert import check_compatible
    from t2dist.policy.load import load_policy

    policy, tokenizer = load_policy(cfg)
    check_compatible(expert, policy, source=f"expert {args.expert}")
    return policy, tokenizer


def _dtype(args):
    import torch

    return getattr(torch, args.dtype) if args.dtype else None


def _export_merged(args, cfg, expert) -> int:
    from t2dist.experts.export import export_merged

    svf, tokenizer = _load_checked(args, cfg, expert)
    out = export_merged(svf, tokenizer, expert.z, expert.card, args.out, dtype=_dtype(args))
    print(f"exported {args.expert} (base {cfg.model.path}) to {out}; load it with "
          f"AutoModelForCausalLM.from_pretrained({str(out)!r})", file=sys.stdout)
    return 0


def _export_lora(args, cfg, expert) -> int:
    from t2dist.experts.lora import export_lora
    from t2dist.models.loading import resolve_model_path

    policy, tokenizer = _load_checked(args, cfg, expert)
    base = resolve_model_path(cfg.model.path, cfg.model.cache_dir)
    out, report = export_lora(policy, tokenizer, expert.z, expert.card, args.out, args.rank, base_model=base,
                              dtype=_dtype(args))
    print(f"exported {args.expert} (base {cfg.model.path}) as a LoRA adapter to {out}")
    for line in report.summary():
        print(line)
    vllm_rank = report.vllm_max_lora_rank
    if vllm_rank is not None:
        print(f"serve it with vLLM: LLM(model={base!r}, enable_lora=True, max_lora_rank={vllm_rank}) and "
              f"LoRARequest(name, 1, {str(out)!r}); or peft: PeftModel.from_pretrained(base_model, {str(out)!r})")
    return 0


HANDLERS = {"registry": cmd_registry, "export": cmd_export}
