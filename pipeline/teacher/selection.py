"""Which layers and heads a job takes: slice or list syntax checked before the model is built, resolved
against it after; and the default layers, shared by precompute and train so the two cannot drift."""
from __future__ import annotations

from attncache.pipeline.teacher.loading import TeacherError

# The paper's default (`end_layer=-3`): every layer but the last 3. A default student transfers these
# (pipeline/train/student.py), so a default precompute caches exactly these and stops the teacher's
# forward after the last of them.
DEFAULT_LAYERS_TEXT = "0:-3"


def default_layers(num_layers: int) -> str:
    """All but the last 3 layers, as the paper's default (`end_layer=-3`); every layer when a model
    has 3 or fewer (an empty selection would be no transfer at all)."""
    return f"0:{num_layers - 3}" if num_layers > 3 else ":"


def _slice_parts(spec: str) -> list[int | None]:
    parts = spec.split(":")
    try:
        numbers = [int(p) if p.strip() else None for p in parts]
    except ValueError:
        numbers = None
    if numbers is None or len(parts) > 3:
        raise TeacherError(f"layer selection {spec!r}: not a slice START:STOP[:STEP] of integers "
                           "(e.g. '0:-3', '::2') or a comma list (e.g. '0,3,7')")
    if len(numbers) == 3 and numbers[2] == 0:
        raise TeacherError(f"layer selection {spec!r}: a slice step cannot be 0 (e.g. '::2' takes every other layer)")
    return numbers


def check_layers_text(spec: str | None) -> None:
    """What can be refused before the model is built: bad syntax, a zero step, a slice that is
    empty in every model (non-negative START >= STOP with a positive step), a repeated layer."""
    spec = (spec or ":").strip()
    if "," in spec or ":" not in spec:
        try:
            chosen = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            chosen = None
        if not chosen:
            raise TeacherError(f"layer selection {spec!r}: not a comma list of layer indices (e.g. '0,3,7') "
                               "or a slice (e.g. '0:-3')")
        if len(set(chosen)) != len(chosen):
            raise TeacherError(f"layer selection {spec!r} names a layer twice")
        return
    start, stop, *step = _slice_parts(spec) + [None] * 2
    step = step[0] if step and step[0] is not None else 1
    if step > 0 and start is not None and stop is not None and 0 <= stop <= start:
        raise TeacherError(f"layer selection {spec!r} selects no layer (START {start} >= STOP {stop}); "
                           "e.g. '0:-3' or '2:5'")


def resolve_layers(spec: str | None, num_layers: int) -> tuple[int, ...]:
    """Python slice syntax over layer indices (`0:-3`, `::2`, `5`) or a comma list (`0,3,7`)."""
    spec = (spec or ":").strip()
    indices = list(range(num_layers))
    if "," in spec or (":" not in spec):
        try:
            chosen = [indices[int(x)] for x in spec.split(",") if x.strip()]
        except (IndexError, ValueError):
            raise TeacherError(f"layer selection {spec!r}: not a slice or list of layers that exist in a model "
                               f"with {num_layers} layers") from None
    else:
        chosen = indices[slice(*_slice_parts(spec))]
    if not chosen or len(set(chosen)) != len(chosen):
        raise TeacherError(f"layer selection {spec!r} selects {chosen} out of {num_layers} layers")
    return tuple(chosen)


def _head_list(spec: str) -> tuple[int, ...]:
    try:
        heads = tuple(int(h) for h in spec.split(",") if h.strip())
    except ValueError:
        heads = ()
    if not heads or min(heads) < 0:
        raise TeacherError(f"head selection {spec!r}: not a comma list of head indices >= 0 (e.g. '0,2') or 'all'")
    if len(set(heads)) != len(heads):
        raise TeacherError(f"head selection {spec!r} names a head twice")
    return heads


def check_heads_text(spec: str | None) -> None:
    """Syntax of a head selection, refused before the model is built (the count needs the model)."""
    if spec is not None and spec.strip() not in ("", "all", ":"):
        _head_list(spec)


def resolve_heads(spec: str | None, num_heads: int) -> tuple[int, ...]:
    if spec is None or spec.strip() in ("", "all", ":"):
        return tuple(range(num_heads))
    heads = _head_list(spec)
    bad = [h for h in heads if not 0 <= h < num_heads]
    if bad:
        raise TeacherError(f"head selection {spec!r}: heads {bad} do not exist in a teacher with {num_heads} heads "
                           f"(0..{num_heads - 1})")
    return heads


def resolve_layers_or_default(spec: str | None, num_layers: int) -> tuple[int, ...]:
    """`spec` resolved, or with None the default layers (those a default student transfers)."""
    return resolve_layers(default_layers(num_layers) if spec is None else spec, num_layers)
