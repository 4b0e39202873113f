"""Attention figures from a store, like the paper's: the replayed image beside attention maps.

The image is rebuilt from the raw shard and the stored augmentation (no teacher); the maps are
softmax(decoded logits), either the class-token query's row or the mean over queries, restricted
to patch tokens and laid out on the patch grid.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from attncache.pipeline._util import atomic
from attncache.pipeline._util.atomic import read_jsonl
from attncache.pipeline.augment.recipe import Recipe
from attncache.pipeline.data.shards import decode_sample, iter_shard
from attncache.pipeline.store.cache import CacheStore
from attncache.pipeline.store.layout import UnitData


def find_key(store: CacheStore, key: str, view: int) -> tuple[int, int]:
    """(shard_index, position) of a key among done units of a view."""
    for unit in store.units():
        if unit.view != view or not store.unit_done(unit):
            continue
        start, stop = store.slot_range(unit.shard_index)
        keys = store.group[f"views/{view}/key"][start:stop]
        hits = np.flatnonzero(keys == key)
        if hits.size:
            return unit.shard_index, int(hits[0])
    raise KeyError(f"key {key!r} is not cached in view {view} of {store.path}")


def cached_keys(store: CacheStore, view: int) -> list[str]:
    """The keys `show --key` can draw in a view: valid samples of its done units, in slot order."""
    keys = []
    for unit in store.units():
        if unit.view != view or not store.unit_done(unit):
            continue
        start, stop = store.slot_range(unit.shard_index)
        names = store.group[f"views/{view}/key"][start:stop]
        valid = store.group[f"views/{view}/valid"][start:stop]
        keys.extend(str(k) for k, ok in zip(names, valid) if ok)
    return keys


def replayed_image(store: CacheStore, shard_index: int, position: int, aug: np.ndarray) -> np.ndarray:
    """HWC float image in [0, 1], de-normalised with the recipe's mean/std."""
    recipe = Recipe.from_json(store.meta["recipe"]["ops"])
    url = store.meta["dataset"]["shards"][shard_index]["url"]
    entry = next(e for e in iter_shard(url) if e.position == position)
    image, _ = decode_sample(url, entry)
    pixels = recipe.apply(aug[: recipe.num_params], image)
    norm = next(op for op in store.meta["recipe"]["ops"] if op["op"] == "normalize")["args"]
    mean = torch.tensor(norm["mean"]).view(3, 1, 1)
    std = torch.tensor(norm["std"]).view(3, 1, 1)
    return (pixels * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def attention_maps(store: CacheStore, view: int, slot: int, query: str) -> np.ndarray:
    """[L, H, gh, gw] attention over patch tokens from the chosen query, from the unit's checked bytes
    (`read_verified_unit`: a damaged unit is refused, not drawn)."""
    shard_index, position = divmod(slot, store.slots_per_shard)
    return maps_of(store, store.read_verified_unit(view, shard_index), position, query)


def maps_of(store: CacheStore, data: UnitData, position: int, query: str) -> np.ndarray:
    """`attention_maps` of the sample at `position` of a unit already read (`read_verified_unit`)."""
    factors = {n: a[position:position + 1] for n, a in data.factors.items()}
    logits = store.encoding.decode(factors, "logits", store.meta["teacher"]["scale"])[0]
    attn = logits.softmax(dim=-1)  # [L, H, N, N]
    prefix = store.meta["tokens"]["num_prefix_tokens"]
    gh, gw = store.meta["tokens"]["grid"]
    if query == "cls":
        if prefix == 0:
            raise ValueError("the teacher has no class token: use --query mean")
        rows = attn[:, :, 0, prefix:]
    else:
        rows = attn[:, :, prefix:, prefix:].mean(dim=2)
    return rows.reshape(*rows.shape[:2], gh, gw).numpy()


def shared_limits(maps: np.ndarray, rows: list[int], cols: list[int]) -> tuple[float, float]:
    """(vmin, vmax) over every panel drawn: the chosen heads of the chosen layers and each layer's
    mean of heads. One scale for all panels, so a near-uniform teacher looks flat beside a peaked
    one instead of each panel being stretched to its own min-max."""
    chosen = maps[rows][:, cols]  # [rows, cols, gh, gw]
    means = maps[rows].mean(axis=1)  # [rows, gh, gw]
    return float(min(chosen.min(), means.min())), float(max(chosen.max(), means.max()))


def teacher_title(meta: dict) -> str:
    """The teacher as it was built: name and its timm arguments (sorted), e.g. `vit_tiny (depth=4, img_size=32)`."""
    args = meta["teacher"].get("model_args") or {}
    text = ", ".join(f"{k}={v}" for k, v in sorted(args.items()))
    return f"{meta['teacher']['name']} ({text})" if text else meta["teacher"]["name"]


def figure(store: CacheStore, key: str, view: int, layers: list[int], heads: list[int] | None, query: str):
    """The matplotlib figure of `show` (not saved): image, mean of heads, each head, one colour bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shard_index, position = find_key(store, key, view)
    data = store.read_verified_unit(view, shard_index)  # the image's parameters and its maps, checked
    image = replayed_image(store, shard_index, position, data.aug[position])
    maps = maps_of(store, data, position, query)
    stored_layers = store.meta["layers"]
    rows = [stored_layers.index(l) for l in layers]
    cols = list(range(maps.shape[1])) if heads is None else [store.meta["heads"].index(h) for h in heads]
    vmin, vmax = shared_limits(maps, rows, cols)
    fig, axes = plt.subplots(len(rows), len(cols) + 2, figsize=(2 * (len(cols) + 2) + 1.2, 2 * len(rows) + 0.5),
                             squeeze=False, layout="constrained")
    shown = None
    for r, li in enumerate(rows):
        axes[r, 0].imshow(image)
        axes[r, 0].set_ylabel(f"layer {stored_layers[li]}")
        shown = axes[r, 1].imshow(maps[li].mean(0), cmap="inferno", vmin=vmin, vmax=vmax)
        axes[r, 1].set_title("mean of heads", fontsize=8)
        for c, hi in enumerate(cols):
            axes[r, c + 2].imshow(maps[li, hi], cmap="inferno", vmin=vmin, vmax=vmax)
            axes[r, c + 2].set_title(f"head {store.meta['heads'][hi]}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(shown, ax=axes[:, 1:].ravel().tolist(), shrink=0.9, label="attention, one scale")
    fig.suptitle(f"{key} view {view}: {query} query\nteacher {teacher_title(store.meta)}, "
                 f"{store.meta['encoding']['spec']}", fontsize=9)
    return fig


def render(store: CacheStore, key: str, view: int, layers: list[int], heads: list[int] | None,
           query: str, out: str) -> str:
    import matplotlib.pyplot as plt

    fig = figure(store, key, view, layers, heads, query)
    atomic.save_figure(fig, out, dpi=100)
    plt.close(fig)
    return out


def learning_curves(runs: dict[str, Path], out: Path, dpi: int = 110) -> Path:
    """Training cross-entropy per step of each run directory (its metrics.jsonl) and, on a second
    axis, its val top-1 at each evaluation (per epoch with `train --eval-every`), the final val top-1
    in the legend; runs without metrics are left out."""
    import matplotlib.pyplot as plt

    fig = learning_curves_figure(runs)
    atomic.save_figure(fig, out, dpi=dpi)
    plt.close(fig)
    return out


def learning_curves_figure(runs: dict[str, Path]):
    """The figure `learning_curves` writes: axes 0 the cross-entropy, axes 1 (if any run evaluated) val top-1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.2, 3.4))
    val_ax = None
    for i, (mode, run_dir) in enumerate(runs.items()):
        if not (run_dir / "metrics.jsonl").is_file():
            continue
        rows = read_jsonl(run_dir / "metrics.jsonl")  # a live or killed run's torn last line is skipped
        train_rows = [r for r in rows if "ce" in r]
        evals = [r for r in rows if isinstance(r.get("eval"), dict) and "top1" in r["eval"]]
        final = evals[-1]["eval"]["top1"] if evals else None
        label = f"{mode} (val top-1 {final:.1f})" if final is not None else mode
        ax.plot([r["step"] for r in train_rows], [r["ce"] for r in train_rows], color=f"C{i}", label=label,
                marker="o" if len(train_rows) < 3 else None, markersize=3)  # a short run logs a point or two
        if evals:
            val_ax = val_ax or ax.twinx()
            val_ax.plot([r["step"] for r in evals], [r["eval"]["top1"] for r in evals], "--o", markersize=3,
                        color=f"C{i}")
    ax.set_xlabel("step")
    ax.set_ylabel("training cross-entropy (solid)")
    if val_ax is not None:
        val_ax.set_ylabel("val top-1 % (dashed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
