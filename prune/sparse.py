"""Sparse pruning (Wanda, SparseGPT, magnitude): zero weights inside the linear layers of every block.

Layer-sequential, as both papers do it: the calibration tokens are embedded once and kept as hidden
states ``[n, seq, hidden]``; for block 0, 1, 2, ... the block's linear layers are watched with forward
hooks while the hidden states pass through it (input statistics), the block is pruned, and the hidden
states are then pushed through the *pruned* block to become the next block's inputs. One block is
resident at a time, so with :meth:`BlockStack.from_pretrained_dir` a model larger than memory is pruned
from its shards; :class:`ShardWriter` then writes the pruned checkpoint shard by shard.

Shapes never change: the output is the same architecture with zeros stored densely, which any loader
reads, and :func:`verify_sparsity` checks (e.g. after a reload) that the zeros and the N:M pattern hold.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from healer.core.errors import HealerError, VerificationError
from healer.model.adapter import ARCHITECTURES, Architecture, architecture_for, get_module, projection_paths
from healer.prune.blockwise import BlockStack
from healer.prune.criteria import get_criterion
from healer.prune.pattern import Pattern, parse_pattern
from healer.prune.sparse_scores import check_shape, magnitude_mask, wanda_mask
from healer.prune.sparsegpt import Hessian, sparsegpt_prune

# Calibration sequences pushed through a block at once: bounds activation memory, not the result.
CHUNK = 8


class ColumnNorms:
    """Running sum of squares of each input feature over every token a linear layer sees (Wanda's ||X_j||^2)."""

    def __init__(self, columns: int, device: torch.device | str = "cpu"):
        self.sq = torch.zeros(columns, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1])
        self.sq += x.double().pow(2).sum(0)
        self.tokens += x.shape[0]


class SparseOptions(NamedTuple):
    pattern: Pattern
    blocksize: int
    percdamp: float


def prune_magnitude(name: str, weight: torch.Tensor, stats: None, opts: SparseOptions):
    """Zero the smallest |W| of the whole layer (the papers' baseline)."""
    mask = magnitude_mask(weight, opts.pattern)
    return weight.masked_fill(mask, 0), {}


def prune_wanda(name: str, weight: torch.Tensor, stats: ColumnNorms, opts: SparseOptions):
    """Zero the smallest |W|·‖X‖ within each output row (or N:M group); ``stats`` saw the layer's inputs."""
    mask = wanda_mask(weight, stats.sq, opts.pattern)
    return weight.masked_fill(mask, 0), {}


def prune_sparsegpt(name: str, weight: torch.Tensor, stats: Hessian, opts: SparseOptions):
    """SparseGPT's OBS pruning with the layer's input Hessian ``stats``; reports the reconstruction loss."""
    new, _, loss = sparsegpt_prune(weight, stats.matrix, opts.pattern, blocksize=opts.blocksize,
                                   percdamp=opts.percdamp, name=name)
    return new, {"obs_loss": loss}


def select_layers(arch: Architecture, layers: Iterable[str] | None) -> dict[str, str]:
    """The projections to prune: all of them by default, else the named roles (errors list the valid names)."""
    paths = projection_paths(arch)
    if layers is None:
        return paths
    layers = list(layers)
    unknown = [name for name in layers if name not in paths]
    if unknown or not layers:
        raise HealerError(f"prune.sparsity.layers: {unknown or '[]'} not projections of a block; choose from "
                          f"{', '.join(paths)} (embeddings and lm_head are never pruned)")
    return {role: paths[role] for role in layers}


def plan_sparsity(config, pattern: str = "unstructured", ratio: float | None = None, *,
                  layers: Iterable[str] | None = None) -> dict:
    """Dry run from a model config alone: which projections would be pruned, how many weights zeroed.

    Builds the model on the ``meta`` device (no memory, no weights), so a 70B config plans in a second. Raises
    :class:`HealerError` for a bad pattern/ratio/layer name or a layer whose width does not fit N:M.
    """
    from transformers import AutoModelForCausalLM

    parsed = parse_pattern(pattern, ratio)
    arch = architecture_for(config)
    roles = select_layers(arch, layers)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    blocks = get_module(skeleton, arch.blocks)
    weights = zeros = 0
    shapes = {}
    for i, block in enumerate(blocks):
        for role, path in roles.items():
            weight = get_module(block, path).weight
            check_shape(weight, parsed, f"{arch.blocks}.{i}.{path}")
            rows, cols = weight.shape
            shapes[role] = [rows, cols]
            weights += rows * cols
            zeros += rows * (cols - cols // parsed.m * parsed.n if parsed.is_nm else int(cols * parsed.ratio))
    return {"blocks": len(blocks), "layers": shapes, "weights": weights, "zeros_at_least": zeros,
            "pattern": str(parsed)}


@torch.no_grad()
def sparsify(stack_or_model: BlockStack | nn.Module, tokens: torch.Tensor | None, *, criterion: str = "wanda",
             pattern: str = "unstructured", ratio: float | None = None, layers: Iterable[str] | None = None,
             blocksize: int = 128, percdamp: float = 0.01,
             write: Callable[[int, dict[str, torch.Tensor]], None] | None = None, progress: bool = True) -> dict:
    """Prune the linear layers of every block, block after block, and return a report.

    ``stack_or_model``: a causal LM in memory (pruned in place) or a :class:`BlockStack` (one block resident at
    a time). ``tokens``: calibration ids ``[n, seq]`` (unused by ``magnitude``); their length is whatever the
    caller chose, never the model's context size. ``criterion``: a sparse entry of
    :data:`healer.prune.criteria.CRITERIA`. ``pattern``:
    ``"unstructured"`` with ``ratio`` (fraction zeroed), or ``"N:M"`` (at most N nonzeros in every M consecutive
    input weights of a row). ``layers``: projection roles to prune (default all, see :func:`projection_paths`).
    ``blocksize``/``percdamp``: SparseGPT's lazy-update width and Hessian damping. ``write(i, tensors)`` receives
    block ``i``'s pruned weights, keyed like the checkpoint, while the block is resident; it is required when
    the blocks are read from disk (pass a :class:`ShardWriter`), since the pruned block is dropped after it.
    """
    started = time.time()
    try:
        crit = get_criterion("sparse", criterion)
    except ValueError as err:
        raise HealerError(str(err)) from None
    opts = SparseOptions(parse_pattern(pattern, ratio), blocksize, percdamp)
    if blocksize <= 0 or not 0 <= percdamp < 1:
        raise HealerError(f"prune.sparsity: blocksize must be > 0 and percdamp in [0, 1), "
                          f"got {blocksize}, {percdamp}")
    if criterion == "sparsegpt" and opts.pattern.is_nm and blocksize % opts.pattern.m:
        raise HealerError(f"prune.sparsity.blocksize {blocksize} must be a multiple of M={opts.pattern.m} "
                          f"for {pattern}")
    in_memory = isinstance(stack_or_model, nn.Module)
    stack = BlockStack.from_model(stack_or_model) if in_memory else stack_or_model
    if write is None and not in_memory and not _blocks_persist(stack):
        raise HealerError("sparsify: the blocks are read from disk and dropped after use; pass write=ShardWriter(...) "
                          "so the pruned weights are saved")
    roles = select_layers(stack.arch, layers)
    plan_sparsity(stack.config, pattern, ratio, layers=layers)  # every block's shapes fit, before any change
    needs_data = crit.statistics is not None
    if needs_data and (tokens is None or tokens.numel() == 0):
        raise HealerError(f"prune.calibration.path is required by sparse criterion {criterion!r}")

    hiddens, contexts = [], []
    if needs_data:
        hiddens = [stack.embed(chunk) for chunk in tokens.split(CHUNK)]
        contexts = [stack.context(h) for h in hiddens]
    per_layer: dict[str, dict] = {}
    bar = tqdm(total=stack.num_blocks, desc=f"{criterion} {opts.pattern}", disable=not progress, unit="block")
    for i in range(stack.num_blocks):
        with stack.block(i) as block:
            linears = {f"{stack.arch.blocks}.{i}.{path}": get_module(block, path) for path in roles.values()}
            for name, linear in linears.items():
                check_shape(linear.weight, opts.pattern, name)
            stats = _collect(stack, block, i, linears, hiddens, contexts, crit.statistics) if needs_data else {}
            for name, linear in linears.items():
                new, extra = crit.score(name, linear.weight, stats.get(name), opts)
                linear.weight.copy_(new)
                per_layer[name] = layer_sparsity(linear.weight, opts.pattern) | extra
            del stats
            if needs_data and i < stack.num_blocks - 1:
                # The paper's sequential step: block i+1 is scored on what the PRUNED block i produces.
                for c, ctx in enumerate(contexts):
                    hiddens[c] = stack.run_block(block, i, hiddens[c], ctx)
            if write is not None:
                write(i, {f"{name}.weight": linear.weight.detach() for name, linear in linears.items()})
        bar.update(1)
    bar.close()
    summary = summarize(per_layer, opts.pattern)
    return {
        "method": "sparse",
        "criterion": criterion,
        "criterion_description": crit.description,
        "pattern": str(pattern).strip(),
        "ratio": opts.pattern.ratio,
        "layers_pruned": list(roles),
        "blocksize": blocksize if criterion == "sparsegpt" else None,
        "percdamp": percdamp if criterion == "sparsegpt" else None,
        "calibration_tokens": [int(s) for s in tokens.shape] if needs_data else None,
        **summary,
        "elapsed_s": round(time.time() - started, 2),
    }


def _blocks_persist(stack: BlockStack) -> bool:
    """False for a stack that reads blocks from disk: it moves each block back to ``meta`` after use."""
    with stack.block(0) as block:
        pass
    return next(block.parameters()).device.type != "meta"


def _collect(stack, block, index, linears, hiddens, contexts, statistics) -> dict:
    """Input statistics of each linear layer over every calibration token, with the block still dense."""
    stats = {name: statistics(linear.in_features, linear.weight.device) for name, linear in linears.items()}
    handles = [linear.register_forward_hook(lambda mod, args, out, s=stats[name]: s.add(args[0]))
               for name, linear in linears.items()]
    try:
        for h, ctx in zip(hiddens, contexts):
            stack.run_block(block, index, h, ctx)
    finally:
        for handle in handles:
            handle.remove()
    return stats


# -- checking -------------------------------------------------------------------------------------------

def layer_sparsity(weight: torch.Tensor, pattern: Pattern | None) -> dict:
    """Zero count of one weight, and for N:M the number of groups holding more than N nonzeros."""
    zeros = int((weight == 0).sum())
    out = {"zeros": zeros, "numel": weight.numel(), "sparsity": zeros / weight.numel(), "in_features": weight.shape[1]}
    if pattern is not None and pattern.is_nm:
        rows, cols = weight.shape
        if cols % pattern.m:
            out["bad_groups"] = -1  # cannot hold the pattern at all
        else:
            nonzero = (weight != 0).reshape(rows, cols // pattern.m, pattern.m).sum(-1)
            out["bad_groups"] = int((nonzero > pattern.n).sum())
    return out


def summarize(per_layer: dict[str, dict], pattern: Pattern | None) -> dict:
    """Overall and per-projection-type sparsity, and whether every layer holds ``pattern`` (None: count only)."""
    problems = []
    by_type: dict[str, list[int]] = {}
    for name, s in per_layer.items():
        kind = name.rsplit(".", 1)[-1]
        acc = by_type.setdefault(kind, [0, 0])
        acc[0] += s["zeros"]
        acc[1] += s["numel"]
        if pattern is None:
            continue
        if pattern.is_nm and s["bad_groups"]:
            problems.append(f"{name}: {s['bad_groups']} groups of {pattern.m} hold more than {pattern.n} nonzeros"
                            if s["bad_groups"] > 0
                            else f"{name}: {s['in_features']} inputs not a multiple of {pattern.m}")
        # Unstructured: each row (or SparseGPT column block) rounds its count down, so allow one weight per row.
        if not pattern.is_nm and s["sparsity"] < pattern.ratio - 1.0 / s["in_features"]:
            problems.append(f"{name}: sparsity {s['sparsity']:.4f} below {pattern.ratio:g}")
    zeros = sum(s["zeros"] for s in per_layer.values())
    numel = sum(s["numel"] for s in per_layer.values())
    return {
        "sparsity": {
            "overall": zeros / numel if numel else 0.0,
            "zeros": zeros,
            "weights": numel,
            "by_type": {k: z / n for k, (z, n) in by_type.items()},
            "per_layer": {name: {k: v for k, v in s.items() if k != "in_features"} for name, s in per_layer.items()},
            "pattern_holds": (not problems and bool(per_layer)) if pattern is not None else None,
            "problems": problems,
        },
    }


def verify_sparsity(model_or_state: nn.Module | dict[str, torch.Tensor] | str | Path,
                    pattern: str | None = "unstructured", ratio: float | None = None, *,
                    layers: Iterable[str] | None = None, arch: Architecture | None = None) -> dict:
    """Per-layer and overall sparsity of the block projections, and whether ``pattern`` holds everywhere.

    ``model_or_state``: a model, a state dict, or a checkpoint directory (read tensor by tensor from its
    safetensors, so a model larger than memory can be checked). For N:M every group of M input weights is
    checked -- what GPU 2:4 kernels need. ``pattern=None`` only counts zeros (``pattern_holds`` is None), e.g.
    for a model whose pruning is unknown. ``layers``: projection roles to check (default all).
    ``arch`` is only needed for a state dict of a family not laid out like Llama.
    Returns ``{"sparsity": {overall, zeros, weights, by_type, per_layer, pattern_holds, problems}}``.
    """
    parsed = parse_pattern(pattern, ratio) if pattern is not None else None
    tensors, arch = _named_tensors(model_or_state, arch)
    paths = select_layers(arch, layers)
    wanted = re.compile(rf"^{re.escape(arch.blocks)}\.\d+\.({'|'.join(re.escape(p) for p in paths.values())})\.weight$")
    per_layer = {name[: -len(".weight")]: layer_sparsity(t, parsed) for name, t in tensors if wanted.match(name)}
    if not per_layer:
        raise HealerError(f"{_describe(model_or_state)} holds no block projection weights to check")
    return summarize(per_layer, parsed)


def _named_tensors(obj, arch: Architecture | None) -> tuple[Iterator[tuple[str, torch.Tensor]], Architecture]:
    if isinstance(obj, nn.Module):
        return ((n, p.detach()) for n, p in obj.named_parameters()), arch or architecture_for(obj.config)
    if isinstance(obj, dict):
        return iter(obj.items()), arch or ARCHITECTURES["llama"]
    path = Path(obj)
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise HealerError(f"{path} is not a model directory (no config.json)")
    return _read_safetensors(path), arch or architecture_for(AutoConfig.from_pretrained(path))


def checkpoint_shards(path: Path) -> list[Path]:
    """The safetensors files a checkpoint directory's loader reads: those its index names, else model.safetensors.

    Stray ``*.safetensors`` files next to them are ignored, as ``from_pretrained`` ignores them.
    """
    index = path / "model.safetensors.index.json"
    if index.is_file():
        import json

        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as err:
            raise HealerError(f"{index} is not a safetensors index with a weight_map ({err})") from None
        return [path / name for name in names]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    raise HealerError(f"{path} has no safetensors weights (model.safetensors or model.safetensors.index.json)")


def _read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in checkpoint_shards(path):
        with safe_open(file, "pt") as fh:
            for key in fh.keys():  # noqa: SIM118 -- safe_open handles are not iterable
                yield key, fh.get_tensor(key)


def _describe(obj) -> str:
    return str(obj) if isinstance(obj, (str, Path)) else type(obj).__name__


# -- writing --------------------------------------------------------------------------------------------

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


class ShardWriter:
    """Writes ``source`` (a safetensors checkpoint directory) to ``out`` with the pruned block weights swapped in.

    Pass it as ``sparsify(..., write=writer)``: each pruned block's weights are staged on disk as soon as the
    block is done, then :meth:`finish` rewrites the shards one at a time (same names, same index, each tensor
    in its original dtype, zeros stored densely) and copies config, tokenizer and the other small files.
    Peak memory is one shard. Use it with ``BlockStack.from_pretrained_dir(source)``.
    """

    def __init__(self, source: str | Path, out: str | Path):
        self.source, self.out = Path(source), Path(out)
        if self.out.resolve() == self.source.resolve():
            raise HealerError(f"prune output {self.out} is the source checkpoint; write the pruned model elsewhere")
        self.shards = checkpoint_shards(self.source)
        names = {shard.name for shard in self.shards}
        stray = sorted(p.name for p in self.out.glob("*.safetensors") if p.name not in names)
        if stray:
            raise HealerError(f"prune output {self.out} already holds other weights ({', '.join(stray[:3])}); "
                              "give an empty directory")
        self.staging = self.out / ".sparse-staging"
        self.staging.mkdir(parents=True, exist_ok=True)
        self.staged: dict[str, Path] = {}

    def __call__(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        file = self.staging / f"block-{index:05d}.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(file))
        self.staged.update({k: file for k in tensors})

    def finish(self) -> list[str]:
        """Write every shard and the non-weight files; returns the shard names written."""
        from safetensors import safe_open
        from safetensors.torch import save_file

        written, used = [], set()
        for shard in self.shards:
            tensors, metadata = {}, None
            with safe_open(shard, "pt") as fh:
                metadata = fh.metadata()
                for key in fh.keys():  # noqa: SIM118 -- safe_open handles are not iterable
                    original = fh.get_tensor(key)
                    if key in self.staged:
                        with safe_open(self.staged[key], "pt") as staged:
                            replacement = staged.get_tensor(key)
                        if replacement.shape != original.shape:
                            raise VerificationError(f"pruned {key} has shape {tuple(replacement.shape)}, the "
                                                    f"checkpoint {tuple(original.shape)}")
                        original = replacement.to(original.dtype)
                        used.add(key)
                    tensors[key] = original
            tmp = self.out / f".{shard.name}.tmp"
            save_file(tensors, str(tmp), metadata=metadata or {"format": "pt"})
            os.replace(tmp, self.out / shard.name)
            written.append(shard.name)
            del tensors
        missing = sorted(set(self.staged) - used)
        if missing:
            raise VerificationError(f"{self.source}: pruned tensors {missing[:3]} are in no shard of the checkpoint")
        for item in self.source.iterdir():
            if item.is_file() and not item.name.startswith(".") and not item.name.endswith(WEIGHT_SUFFIXES):
                if item.name.endswith(".index.json") and not item.name.startswith("model.safetensors"):
                    continue  # e.g. pytorch_model.bin.index.json: its weights are not copied
                shutil.copy2(item, self.out / item.name)
        shutil.rmtree(self.staging, ignore_errors=True)
        return written


def save_sparse(model: nn.Module, tokenizer, out_dir: str | Path, pattern: str = "unstructured",
                ratio: float | None = None, *, layers: Iterable[str] | None = None, atol: float = 1e-3) -> dict:
    """Save an in-memory pruned model as a plain HF directory, reload it and check logits and the zeros.

    ``pattern``/``ratio``/``layers`` as given to :func:`sparsify`. Returns ``{"reload_max_logit_diff", "sparsity"}``
    where ``sparsity`` is :func:`verify_sparsity` of the files written; raises if the pattern did not survive.
    """
    from healer.model.modeling import save_and_verify

    in_memory = verify_sparsity(model, pattern, ratio, layers=layers)["sparsity"]["zeros"]
    diff = save_and_verify(model, tokenizer, out_dir, atol=atol)
    saved = check_saved(out_dir, pattern, ratio, layers=layers)
    if saved["sparsity"]["zeros"] != in_memory:
        raise VerificationError(f"{out_dir}: {saved['sparsity']['zeros']} zero weights on disk, {in_memory} in memory "
                                f"(the {model.dtype} save rounded weights to zero or back)")
    return {"reload_max_logit_diff": diff, **saved}


def check_saved(out_dir: str | Path, pattern: str, ratio: float | None, *, layers: Iterable[str] | None = None) -> dict:
    """:func:`verify_sparsity` of a written directory; raises :class:`VerificationError` if the pattern broke."""
    result = verify_sparsity(out_dir, pattern, ratio, layers=layers)
    if not result["sparsity"]["pattern_holds"]:
        raise VerificationError(f"{out_dir}: the saved weights lost the {pattern} sparsity: "
                                + "; ".join(result["sparsity"]["problems"][:3]))
    return result


# -- the stage's entry (the lead hooks this into the criteria registry) ---------------------------------

def prune_sparse(location, out_dir: str | Path, tokens: torch.Tensor | None, tokenizer, *, criterion: str,
                 pattern: str, ratio: float | None = None, layers: Iterable[str] | None = None, blocksize: int = 128,
                 percdamp: float = 0.01, dtype: torch.dtype = torch.float32, verify_atol: float = 1e-3,
                 from_disk: bool | None = None, progress: bool = True, extra: dict | None = None,
                 started: float | None = None) -> dict:
    """``prune.method: sparse`` end to end: prune, write a plain HF directory, check it, write prune_report.json.

    ``location``: a :class:`healer.model.modeling.ModelLocation`. A local directory with safetensors is pruned from its
    shards one block at a time and rewritten shard by shard (the check re-reads the written files the way
    ``from_pretrained`` does -- through the index -- without loading the whole model); anything else (GGUF, hub
    id, .bin weights) is loaded into memory, pruned, saved, reloaded with ``from_pretrained`` and compared by
    logits. ``tokens``/``criterion``/``pattern``/``ratio``/``layers``/``blocksize``/``percdamp`` as in
    :func:`sparsify`; ``dtype`` is what blocks are computed in; ``verify_atol`` the allowed reload logit difference.
    ``from_disk``: None chooses as above; False loads the model into memory even from a safetensors directory.
    ``extra``: more report fields (the stage's seed, versions ...); ``started``: when the caller's work began
    (``time.time()``), so ``elapsed_s`` covers reading the calibration text too.
    """
    from healer.core.manifest import write_json_atomic
    from healer.model.modeling import load_model

    out = Path(out_dir)
    readable = location.is_local_dir and (Path(location.path) / "config.json").is_file() and (
        (Path(location.path) / "model.safetensors").is_file()
        or (Path(location.path) / "model.safetensors.index.json").is_file())
    kwargs = {"criterion": criterion, "pattern": pattern, "ratio": ratio, "layers": layers, "blocksize": blocksize,
              "percdamp": percdamp, "progress": progress}
    if from_disk and not readable:
        raise HealerError(f"{location} is not a directory of safetensors shards; it cannot be pruned block by block")
    if readable if from_disk is None else from_disk:
        writer = ShardWriter(location.path, out)
        report = sparsify(BlockStack.from_pretrained_dir(location.path, dtype), tokens, write=writer, **kwargs)
        writer.finish()
        saved = check_saved(out, pattern, ratio, layers=layers)
        if saved["sparsity"]["zeros"] != report["sparsity"]["zeros"]:
            raise VerificationError(f"{out}: {saved['sparsity']['zeros']} zero weights written, "
                                    f"{report['sparsity']['zeros']} pruned (the checkpoint dtype rounds them)")
        report["reload_check"] = "safetensors re-read through the index: every zero and the pattern present"
        report["pruned_from"] = "disk, one block at a time"
    else:
        model = load_model(location, dtype)
        report = sparsify(model, tokens, **kwargs)
        saved = save_sparse(model, tokenizer, out, pattern, ratio, layers=layers, atol=verify_atol)
        report["reload_check"] = (f"from_pretrained logits within {saved['reload_max_logit_diff']:.2e}; every zero "
                                  "and the pattern present in the files")
        report["pruned_from"] = "memory"
    report["source"] = str(location)
    report.update(extra or {})
    if started is not None:
        report["elapsed_s"] = round(time.time() - started, 2)
    write_json_atomic(out / "prune_report.json", report)
    return report
