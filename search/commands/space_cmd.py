"""`prunetune space`: show the prunable groups of a model built for a dataset.

The model is built untrained for the dataset's classes, channels and image size, and traced once
(no training). The table lists each group's channels, the fewest it may keep and its share of the
base MACs, then the residual stages with their blocks, the droppable ones, and the base MACs and
parameters, and the dimension of each policy parameterisation. ``--json`` prints
the space's JSON and nothing else: the file a policy is written against.
"""

from __future__ import annotations

import argparse
import json

from prunetune.search.commands import common

NAME = "space"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `space` and its arguments."""
    parser = subparsers.add_parser(
        NAME, help="show a model's prunable channel groups and base MACs",
        description="Build MODEL for DATASET (untrained) and list its prunable channel groups, "
                    "droppable blocks, base MACs and parameters.")
    common.add_model_data_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the search space as JSON only")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Build the space and print it as a table, or as JSON with --json."""
    args.model = common.check_model_name(args.model)
    from prunetune.pruning.dependency import explain_space
    from prunetune.pruning.models import create_model

    info = common.load_splits(args).info
    model = create_model(args.model, num_classes=info.num_classes, in_channels=info.in_channels,
                         model_args=common.model_args(args))
    space, why = explain_space(model, args.model, common.input_shape(info))
    if args.json:
        print(json.dumps(space.to_json(), indent=1))
    else:
        print(format_space(space, info.name, why))
    return 0


def format_space(space, dataset_name: str, why: dict[str, str] | None = None) -> str:
    """The space as a text table: groups, droppable blocks, base MACs and parameters; ``why``: the
    layers the space left out although Torch-Pruning traced them, and why (``explain_space``)."""
    from prunetune.search.summary import human_count

    shape = "x".join(str(size) for size in space.input_shape)
    width = max([len("group")] + [len(g.name) for g in space.groups])
    lines = [f"search space of {space.model_name} on {dataset_name} ({shape} input), id {space.space_id}",
             "",
             f"{'group':<{width}}  {'channels':>8}  {'min':>5}  {'MACs share':>10}"]
    for g in space.groups:
        lines.append(f"{g.name:<{width}}  {g.channels:>8}  {g.min_channels:>5}  {g.macs_share:>10.1%}")
    lines += ["",
              f"{len(space.groups)} groups, {sum(g.channels for g in space.groups)} channels; "
              "a group's MACs share counts every layer its channels enter or leave",
              *format_stages(space),
              format_whole(space, why or {}),
              "droppable blocks: " + (", ".join(space.droppable_blocks) or "none"),
              format_dimensions(space),
              f"base MACs:   {human_count(space.base_macs)} ({space.base_macs:,})",
              f"base params: {human_count(space.base_params)} ({space.base_params:,})"]
    return "\n".join(lines)


def format_dimensions(space) -> str:
    """How many coordinates a sampler searches in each ``space.parameterisation`` (README, Methods)."""
    from prunetune.methods.parameterisation import PARAMETERISATIONS, dimension_count

    counts = ", ".join(f"{kind} {dimension_count(kind, space)}" for kind in PARAMETERISATIONS)
    depth = f"; space.search_depth adds {len(space.droppable_blocks)} drop flags" if space.droppable_blocks else ""
    return f"policy dimensions (space.parameterisation): {counts}{depth}"


def format_whole(space, why: dict[str, str]) -> str:
    """The convolutions and linear layers left whole: no group holds their output channels (the
    classifier, whose outputs are the classes, and any layer Torch-Pruning cannot prune), each with
    the reason where the space's dry run left it out."""
    whole = [layer.name + (f" ({why[layer.name]})" if layer.name in why else "")
             for layer in space.layers if layer.out_group is None]
    return "left whole (output channels not pruned): " + (", ".join(whole) or "none")


def format_stages(space) -> list[str]:
    """The residual stages, one line each: blocks in order, marked by shortcut (depth search)."""
    if not space.blocks:
        return ["residual stages: none"]
    mark = {"identity": "", "projection": "*", "none": "-"}
    lines = ["residual stages, blocks in order (* dropped into its projection shortcut, - no shortcut: kept):"]
    for stage in space.stages:
        lines.append(f"  {stage.name}: " + " ".join(name + mark[space.block(name).shortcut] for name in stage.blocks))
    return lines
