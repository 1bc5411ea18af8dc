"""The command line every script shares: the help formatter, presets as parser
defaults, and the "run" options.

Presets are parser defaults. ``PresetParser`` first reads the flags that choose
a preset (``--preset``, ``--detector``, ``--method``...), asks its ``presets``
function for the defaults of that choice, sets them with ``set_defaults`` and
only then parses the command line. So ``--help`` shows the value each flag
will take for the chosen preset and detector, a flag given on the command
line always wins, and no script needs a second "fill in the blanks" pass:

    p = PresetParser("finetune.py", preset_keys=("preset", "detector"), presets=finetune_defaults)
    p.add_argument("--preset", choices=["demo", "coco"], default="demo")
    ...
    args = p.parse_args(["--preset", "coco"])   # every default is coco's now
"""
import argparse
import sys


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each option's default and the script's runbook as written."""


class PresetParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose defaults follow a preset.

    Args:
        preset_keys: dests of the flags that choose the preset; they must be
            added to the parser like any flag (their own defaults apply).
        presets: ``presets(**{key: value})`` -> ``{dest: default}`` for that choice.
        Anything else goes to ``argparse.ArgumentParser``; the formatter
        defaults to ``HelpFormatter``.
    """

    def __init__(self, *args, preset_keys=(), presets=None, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.preset_keys, self.presets = tuple(preset_keys), presets
        self._own_defaults = None

    def parse_known_args(self, args=None, namespace=None):
        if self.presets is not None:
            args = list(sys.argv[1:] if args is None else args)
            self.set_defaults(**self.preset_defaults(args))
        return super().parse_known_args(args, namespace)

    def preset_defaults(self, args):
        """The defaults for the preset ``args`` choose (the parser's own defaults under them)."""
        if self._own_defaults is None:  # before any preset was applied
            self._own_defaults = {a.dest: a.default for a in self._actions
                                  if argparse.SUPPRESS not in (a.dest, a.default)}  # not --help's
        chooser = argparse.ArgumentParser(add_help=False)
        for action in self._actions:
            if action.dest in self.preset_keys:
                chooser.add_argument(*action.option_strings, dest=action.dest, choices=action.choices,
                                     type=action.type, default=self._own_defaults[action.dest])
        chosen, _ = chooser.parse_known_args(args)
        defaults = dict(self._own_defaults)
        defaults.update(self.presets(**vars(chosen)))
        unknown = sorted(set(defaults) - set(self._own_defaults))
        if unknown:
            raise KeyError(f"preset sets options the parser does not have: {', '.join(unknown)}")
        return defaults


# --workers of the three scripts; engine.start_run resolves "auto" (engine.default_workers).
WORKERS_HELP = ("data-loading processes per training process; auto: 2 with a GPU, 0 on a CPU, where torch's "
                "threads already use every core and loading in the training process was faster")


def workers_count(value: str):
    """``--workers``: "auto" or a count >= 0."""
    if value == "auto":
        return value
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise argparse.ArgumentTypeError(f"expected auto or a number of processes >= 0, got {value!r}")
    return count


def add_run_arguments(parser, output_dir):
    """The "run" options every script shares (``engine.start_run`` reads them); returns the
    group so a script can add its own (evaluation, ...)."""
    r = parser.add_argument_group("run")
    r.add_argument("--output-dir", default=output_dir, help="checkpoint.pth, log.jsonl, metrics go here")
    r.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from --output-dir's checkpoint (or the given file)")
    r.add_argument("--checkpoint-every", type=int, default=0, help="also save every N iterations (0: per epoch)")
    r.add_argument("--max-iters", type=int, default=None, help="cap iterations per epoch (smoke tests)")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    r.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="mixed precision (CUDA only)")
    r.add_argument("--seed", type=int, default=0, help="torch seed (plus the rank); also the data order")
    r.add_argument("--print-freq", type=int, default=20, help="log every N iterations")
    return r


def add_step_schedule_arguments(parser, epochs_help):
    """The optimiser and its step schedule (train_box.py, finetune.py); ``engine.step_schedule_optimizer``
    and ``engine.train_one_epoch`` read them."""
    o = parser.add_argument_group("optimisation (defaults: --preset's)")
    o.add_argument("--epochs", type=int, help=epochs_help)
    o.add_argument("--batch-size", type=int, help="images per process per step")
    o.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd", help="SGD with momentum, or AdamW")
    o.add_argument("--lr", type=float, help="learning rate for 16 images per step (scaled to the real batch)")
    o.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    o.add_argument("--weight-decay", type=float, help="weight decay")
    o.add_argument("--backbone-lr-mult", type=float, default=1.0, help="the backbone's lr as a multiple of --lr")
    o.add_argument("--clip-grad-norm", type=float, default=0.0, help="clip the gradients' L2 norm (0: off)")
    o.add_argument("--warmup-iters", type=int, help="linear warm-up iterations")
    o.add_argument("--lr-steps", type=int, nargs="*", help="epochs at which lr is multiplied by 0.1")
    return o


def runbook_parser(prog, doc, **kwargs):
    """A ``PresetParser`` whose description is ``doc`` up to "Runbook" and whose epilog is the rest."""
    cut = doc.index("Runbook")
    return PresetParser(prog, description=doc[:cut].strip(), epilog=doc[cut:], **kwargs)
