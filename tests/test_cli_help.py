"""Every option's help states its default, and the default it states is the one the code uses:
the parser's own, or, for an option left unset so that a recipe decides, the dataclass's."""

from __future__ import annotations

import argparse
import re

import pytest

from swift_sampler.cli import build_parser

# Options the parser leaves at None so that a dataclass decides: the stated default must be
# that dataclass's (or a recipe's, named as such).
DECIDED_BY = {
    ("search", "run"): "swift_sampler.search.settings:InnerLoopSettings",
    ("train",): "swift_sampler.train.presets:TrainConfig",
}
SEARCH_FIELDS = {"finetune_lr": "lr", "lr_fraction": "lr_fraction", "schedule": "schedule",
                 "repeats": "repeats", "start": "start", "score": "score", "features": "features",
                 "selection": "selection", "finetune_epochs": "epochs"}
FLAGS = (argparse._HelpAction, argparse._StoreTrueAction, argparse._StoreFalseAction,
         argparse._VersionAction, argparse._StoreConstAction)


def _options(parser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, (*prefix, name))
        elif action.option_strings and not action.required and not isinstance(action, FLAGS):
            yield prefix, parser, action


OPTIONS = list(_options(build_parser()))


def _rendered(parser, action) -> str:
    return " ".join(parser._get_formatter()._expand_help(action).split())


def _stated(parser, action) -> str | None:
    m = re.search(r"\(default: ([^)]*)\)", _rendered(parser, action))
    return m.group(1) if m else None


@pytest.mark.parametrize("prefix,parser,action", OPTIONS,
                         ids=[" ".join(p) + " " + a.option_strings[-1] for p, _, a in OPTIONS])
def test_every_option_states_the_default_the_code_uses(prefix, parser, action):
    stated = _stated(parser, action)
    assert stated is not None, f"{action.option_strings[-1]}: help says no '(default: ...)'"
    if action.default is not None:
        assert _states(stated, action.default), (stated, action.default)
        return
    home = DECIDED_BY.get(tuple(prefix))
    if home is None:
        return
    import dataclasses
    import importlib

    module, _, cls = home.partition(":")
    fields = {f.name: f.default for f in dataclasses.fields(getattr(importlib.import_module(module), cls))}
    field = SEARCH_FIELDS.get(action.dest, action.dest) if prefix == ("search", "run") else action.dest
    if field not in fields or fields[field] is None or "the preset's" in stated:
        return  # a None says "decided elsewhere": the help says where
    assert _states(stated, fields[field]), (stated, fields[field])


def _states(stated: str, value) -> bool:
    """``stated`` begins with ``value`` as a whole word (``2``, not ``20``)."""
    text = str(value)
    return stated.startswith(text) and stated[len(text):len(text) + 1] in ("", ",", " ", ";")


def test_the_search_and_train_defaults_are_the_dataclasses():
    from swift_sampler.search.settings import GuardSettings, InnerLoopSettings

    args = build_parser().parse_args(["search", "run", "--store", "s", "--checkpoint", "c", "--name", "n"])
    assert args.finetune_epochs == InnerLoopSettings.epochs
    assert (args.guard_candidates, args.guard_repeats, args.guard_inner_loop) == (
        GuardSettings.candidates, GuardSettings.repeats, GuardSettings.inner_loop)
