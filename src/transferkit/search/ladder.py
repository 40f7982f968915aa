"""Which rungs of the recipe search run and with which settings, as the options given and the training images
allow: crops, view sets, poolings, the MLP head, the larger input, the stronger backbones, the fine-tuning kinds."""

from __future__ import annotations


from .state import Candidate, Context, Search


# The two-scale probe reads images at this multiple of the input size (FixRes, Touvron et al. 2019: a network
# sees objects larger at test time than in its training crops, so a larger test input suits it)...
LARGER_INPUT = 4 / 3
# ...where the images have that many pixels (upsampling adds no detail) and it differs enough to matter;
# images up to LARGER_INPUT_MAX × the input are read at their own size (no resampling to blur fine detail).
LARGER_INPUT_MIN, LARGER_INPUT_MAX = 1.15, 1.5
# A stronger backbone's cost is first guessed from its multiply-accumulates, times this (see probes.stronger_backbone).
STRONGER_COST_MARGIN = 1.1
# (pooling, top stages; None = every tap), the usual winner first: the CV stops where the budget does
POOLING_STAGES = (("meanmax", None), ("mean", 1))


def tries_pixels(search: Search, ctx: Context) -> bool:
    """Whether the probes' CV tries the raw pixels: as --probe-pixels says where given, else on small images."""
    return search.cfg.probe_pixels if "probe_pixels" in search.given else ctx.small_images


def view_sets_down_from(search: Search, best: Candidate) -> list[str]:
    """The best probe's view set, then the one inside it with half its views (the sets are nested), for a
    costlier probe that may not fit with all of those views; only the best's where the views were given.
    No fewer: each doubling of the views gained ~0.4-0.6 points of CV on ELPV, which a second scale or a
    stronger backbone may make up once, not twice (ELPV 2 classes, default budget: on the image alone, the
    two-scale probe scored 0.8694 and lite1 0.8709 against 0.8826 for the 4-view probe, 76 s for nothing)."""
    from ..engine.probe_train import PROBE_VIEWS

    mine = best.settings["probe_views"]
    if "probe_views" in search.given:
        return [mine]
    return [mine] + [name for name, views in PROBE_VIEWS.items() if len(views) * 2 == len(PROBE_VIEWS[mine])]


def stronger_options(search: Search, ctx: Context) -> list[tuple]:
    """(spec, cost per view against the first backbone) of each stronger backbone the search may try, strongest
    first: none where the backbone, its weights or its input size were given."""
    from ..models.registry import get_spec
    from ..models.weights import weights_available

    if {"model", "weights", "image_size"} & search.given or not search.cfg.pretrained or not ctx.spec.macs:
        return []
    options = []
    for spec in map(get_spec, ctx.spec.stronger):
        if spec.macs and weights_available(spec)[0]:
            # multiply-accumulates undercount what a larger backbone costs on a CPU (lite2: 2.2× lite0's, timed
            # 2.4× on ELPV): the margin keeps the plan on the safe side until its extraction times the real rate
            options.append((spec, ctx.cost * spec.macs / ctx.spec.macs * STRONGER_COST_MARGIN))
    return options


def probe_ladder(search: Search, ctx: Context) -> tuple[list, list[str]]:
    """The crops and view sets the probes climb through, each as given where it was."""
    cfg, given = search.cfg, search.given
    crops = [cfg.crop_fraction] if "crop_fraction" in given else _crop_options(ctx)
    if "probe_views" in given:
        return crops, [cfg.probe_views]
    # declared rotation-safe: from the mirror straight to all 8 views
    return crops, ["none", "flip", "dihedral"] if cfg.rotation_safe else ["none", "flip", "turns", "dihedral"]


def mlp_asked(search: Search) -> bool:
    return "probe_head" in search.given and search.cfg.probe_head == "mlp"


def _crop_options(ctx: Context) -> list:
    own = ctx.spec.preprocessing.crop_fraction
    return [None, 1.0] if own < 0.999 else [None]


def carried_pooling(best: Candidate) -> list:
    """The (pooling, stages, pixels) option a view step's CV scores: the one its crop's best probe chose, as the
    step keeps that crop. On ELPV the other option (the top tap's 1,280 means against mean+max of six taps, 4,048
    features) never won past the first view, yet took about a fifth of each CV, and the 8-view step missed the
    default budget by 4 s (benchmarks/RESULTS.md, notes of session 23). The best probe chose among
    pooling_options, so pieces given on the command line are already in its choice."""
    s = best.settings
    return [(s["probe_pooling"], s["probe_stages"], s["probe_pixels"])]


def tries_mlp(search: Search) -> bool:
    """Whether the ladder has the MLP step: not where --probe-head linear was given, nor where a --mode that
    fine-tunes was (the probes then only start and judge the fine-tuning, which takes a linear head)."""
    from ..modes import get_mode

    cfg, given = search.cfg, search.given
    if "probe_head" in given:
        return cfg.probe_head == "mlp"
    return "mode" not in given or not get_mode(cfg.mode).trains_backbone


def pooling_options(search: Search, ctx: Context) -> list[tuple]:
    """Every (pooling, stages, pixels) a probe's CV may score, less what was given."""
    cfg, given = search.cfg, search.given
    options = [(cfg.probe_pooling, cfg.probe_stages)] if {"probe_pooling", "probe_stages"} & given else POOLING_STAGES
    options = [(pooling, stages, False) for pooling, stages in options]
    if "probe_pixels" in given:
        options = [(pooling, stages, cfg.probe_pixels) for pooling, stages, _ in options]
    elif ctx.small_images:  # small images: the first option's features with the raw pixels too
        options.append((*options[0][:2], True))
    return options


def larger_size(ctx: Context) -> int | None:
    """The two-scale probe's larger input: the training images' own shorter side (median of a sample) where
    that is at most LARGER_INPUT_MAX × the backbone's input, else LARGER_INPUT × it; None where it would not
    be LARGER_INPUT_MIN × larger."""
    native = ctx.pre(None).input_size
    short = ctx.shorter_side
    size = short if short <= native * LARGER_INPUT_MAX else int(native * LARGER_INPUT) // 8 * 8
    return size if size >= native * LARGER_INPUT_MIN else None


def finetune_kinds(search: Search, ctx: Context) -> list[str]:
    """The fine-tuning candidates the search may try: none where a --mode given keeps the backbone frozen or the
    backbone has no stages (LP-FT needs them: engine/probe_train.py), only the --mode given where it trains."""
    from ..modes import get_mode

    cfg = search.cfg
    if not ctx.spec.stages or ("mode" in search.given and not get_mode(cfg.mode).trains_backbone):
        return []
    return [cfg.mode] if "mode" in search.given else ["partial", "finetune"]
