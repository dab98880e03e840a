"""A study's command line: reproduce.py's own flags, study files (``@studies/NAME.txt``), the
quick study when neither a study file nor data is given, and the flags for every run (after
`--`), checked before any run starts.

    python reproduce.py @studies/ml-100k-bert4rec.txt --seeds 222 -- --first_order=True
"""
import argparse
import shlex
import sys
from pathlib import Path

import options
from run.errors import UserError

PROJECT_DIR = Path(__file__).resolve().parents[1]
QUICK_STUDY = "studies/quick.txt"   # what runs with neither a study file nor --data_path
PAPER_MODELS = ("gru4rec", "narm", "sasrec", "bert4rec")
METHODS = ("basic", "maml", "melo")           # the paper's table
TUNED_INNER_LRS = (3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)   # with MAML's own 1e-3: the tuned step's grid
# variants of MAML or MELO that a study may add, each one run per model and seed with its own
# columns and paired differences: name -> (title, main.py's method, its flags)
RUN_VARIANTS = {
    "melo_normalized": ("MELO (normalised)", "melo", ["--normalize_weights=True"]),
    "melo_rating_blind": ("MELO (rating-blind encoder)", "melo", ["--rating_blind_encoder=True"]),
    "maml_inverse_frequency": ("MAML (inverse-frequency weights)", "maml",
                               ["--use_adaptive_loss=False", "--inverse_frequency_weights=True"]),
    # the paper's ablations of MELO
    "melo_mlp_encoder": ("MELO (MLP encoder)", "melo", ["--use_lstm=False", "--use_mlp=True"]),
    "melo_loss_network": ("MELO (loss network)", "melo", ["--use_mlp_mean=True"]),
    "melo_focal": ("MELO (focal inner loss)", "melo", ["--use_focal_loss=True"]),
    "melo_softmax": ("MELO (softmax weights)", "melo", ["--use_softmax=True"]),
    **{f"maml_inner_lr_{rate:g}": (f"MAML (--inner_lr={rate:g})", "maml",
                                   ["--use_adaptive_loss=False", f"--inner_lr={rate:g}"])
       for rate in TUNED_INNER_LRS},
}
# variants chosen per model and seed on the validation users (never the test's) among runs:
# name -> (title, the runs it chooses from)
TUNED_VARIANTS = {
    "maml_tuned_step": ("MAML (inner step tuned on validation)",
                        ("maml", *(f"maml_inner_lr_{rate:g}" for rate in TUNED_INNER_LRS))),
}
VARIANTS = {**RUN_VARIANTS, **{name: (title, "maml", []) for name, (title, _) in TUNED_VARIANTS.items()}}
NORMALIZED_MELO = "melo_normalized"
TITLES = {"basic": "Basic", "maml": "MAML", "melo": "MELO", "mean_rating": "mean rating",
          **{name: title for name, (title, _, _) in VARIANTS.items()},
          "gru4rec": "GRU4Rec", "narm": "NARM", "sasrec": "SASRec", "bert4rec": "BERT4Rec",
          "ncf": "NCF", "rmse": "RMSE", "mae": "MAE"}   # how tables and figures name each
DATA_FLAGS = options.flags_with(study="data")        # reproduce.py's own flags, the same for every run
BUDGET_FLAGS = options.flags_with(study="budget")
# reproduce.py sets these for each run, so they are not accepted after `--`
RESERVED_FLAGS = frozenset(flag.name for flag in options.FLAGS if flag.study is not None)


def build_parser():
    run_defaults = options.build_parser()
    parser = argparse.ArgumentParser(
        usage="%(prog)s [@STUDY] [options] [-- flags for every run]",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Run Basic, MAML and MELO for each model and seed, and the mean-rating "
        "baseline, then write the results table, the data statistics and a per-rating "
        "figure under RESULTS_DIR/NAME/. Finished runs are reused. @STUDY reads flags from a "
        f"file (studies/*.txt; later flags override it); with neither a study file nor "
        f"--data_path, {QUICK_STUDY} runs: the quick study on the bundled MovieLens latest-small.",
        epilog="Flags after `--` are passed to every run, e.g. `-- --first_order=True "
        "--device=cuda` (see `python main.py --help`). table.md also gives MELO − MAML and "
        "MELO − Basic in test RMSE with a 95 % paired-bootstrap interval over the test users "
        "(per seed and pooled): an interval that excludes 0 is a difference that the choice of "
        "test users does not explain.")
    add = parser.add_argument
    add("--mode", default=run_defaults.get_default("mode"), choices=options.MODES,
        help="dataset reader")
    add("--data_path", default=None,
        help=f"rating file; None: the quick study's when no @STUDY is given, else "
        f"{run_defaults.get_default('data_path')}")
    for flag in DATA_FLAGS + BUDGET_FLAGS:
        add(f"--{flag}", type=int, default=run_defaults.get_default(flag),
            help=options.FLAG[flag].help)
    add("--models", nargs="+", choices=options.MODELS, default=list(PAPER_MODELS), metavar="MODEL",
        help=f"recommenders, one table row each: {', '.join(options.MODELS)}")
    add("--seeds", nargs="+", type=int, default=[run_defaults.get_default("random_seed")],
        metavar="SEED", help="--random_seed of the runs (data split, test users); several "
        "give mean ± std")
    add("--variants", nargs="+", choices=list(VARIANTS), default=[], metavar="VARIANT",
        help="also run these variants, each as its own columns and paired differences: "
        + "; ".join([*(f"{name}: {' '.join(flags)}" for name, (_, _, flags) in RUN_VARIANTS.items()),
                     *(f"{name}: of {', '.join(runs)}, the run of the best validation RMSE"
                       for name, (_, runs) in TUNED_VARIANTS.items())]))
    add("--normalized_melo", action="store_true", help="the same as --variants melo_normalized")
    add("--reference_results", default=None, metavar="DIR",
        help="per-user test errors of the reference code's MAML and MELO on the same users, as "
        "benchmarks/reference_study.py writes them: table.md sets its MELO − MAML beside ours")
    add("--jobs", type=int, default=1, metavar="N",
        help="runs at once, each with its share of the cores (OMP_NUM_THREADS); Basic and the "
        "baselines first, then every seed's MAML and MELO, then the variants")
    add("--nproc_per_node", type=int, default=1, metavar="N",
        help="run Basic, MAML and MELO under torchrun with N processes each, e.g. one per GPU "
        "(default: %(default)s)")
    add("--report_finished", action="store_true",
        help="run nothing: write the reports of the models and seeds whose runs have all finished, "
        "a look at a study still under way (another process may be running it)")
    add("--from_results", action="store_true",
        help="a runs folder with no finished run first gets the runs that NAME/results.json "
        "records, if it has the same flags: a study goes on in a fresh clone or on another "
        "machine, computing only what the committed tables lack")
    add("--name", default=None,
        help="dataset name in the results folder; None: the data file's folder and --mode")
    add("--results_dir", default="results", help="where NAME/ goes")
    return parser


def parse_command_line(argv=None):
    """reproduce.py's own flags, with study files read in; ``run_flags`` holds those after
    `--`, for every run, and ``study_files`` the study files read."""
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    own, run_flags, study_files = read_study_files(argv[:split])
    study = build_parser().parse_args(own)
    if not study_files and study.data_path is None:
        own, run_flags, study_files = read_study_files([f"@{PROJECT_DIR / QUICK_STUDY}", *own])
        study = build_parser().parse_args(own)
        study_files = [QUICK_STUDY]
    study.data_path = study.data_path or options.build_parser().get_default("data_path")
    study.study_files = study_files
    study.models = list(dict.fromkeys(study.models))
    study.seeds = list(dict.fromkeys(study.seeds))
    for seed in study.seeds:
        if (wrong := options.FLAG["random_seed"].out_of_range(seed)) is not None:
            raise UserError(f"--seeds {seed}: {wrong.split(' ', 1)[1]}")
    for flag in ("jobs", "nproc_per_node"):
        if getattr(study, flag) < 1:
            raise UserError(f"--{flag}={getattr(study, flag)}: give at least 1")
    study.run_flags = [*run_flags, *argv[split + 1:]]
    study.methods = [*METHODS, *dict.fromkeys([*([NORMALIZED_MELO] if study.normalized_melo else []), *study.variants])]
    study.run_methods = run_methods(study.methods)
    study.command = shlex.join(["python", "reproduce.py", *argv])
    study.name = study.name or default_name(study.data_path, study.mode)
    return study


def run_methods(methods):
    """The methods that run, in order: ``methods`` with each tuned variant replaced by its runs."""
    return list(dict.fromkeys(run for method in methods
                              for run in (TUNED_VARIANTS[method][1] if method in TUNED_VARIANTS else [method])))


def read_study_files(argv, reading=()):
    """``argv`` with each ``@FILE`` replaced by the flags in FILE (shell words, one or more a
    line, ``#`` comments; a `--` in it starts flags for every run; an ``@OTHER`` in it reads
    OTHER, a path from FILE's folder, in its place); returns the flags, the files' run flags
    and the files as given in ``argv``. ``reading``: the files whose reading led here."""
    flags, run_flags, files = [], [], []
    for word in argv:
        if not word.startswith("@"):
            flags.append(word)
            continue
        path = Path(word[1:])
        if path.resolve() in reading:
            circle = " -> ".join(file.name for file in (*reading[reading.index(path.resolve()):], path))
            raise UserError(f"the study files read each other in a circle ({circle}); remove one "
                            f"of those @ lines")
        try:
            words = shlex.split(path.read_text(), comments=True)
        except OSError as error:
            raise UserError(f"cannot read the study file {path}: {error.strerror}; the committed "
                            f"studies are in {PROJECT_DIR / 'studies'}") from None
        split = words.index("--") if "--" in words else len(words)
        included = [f"@{path.parent / given[1:]}" if given.startswith("@") else given for given in words[:split]]
        file_flags, file_run_flags, _ = read_study_files(included, (*reading, path.resolve()))
        flags += file_flags
        run_flags += [*file_run_flags, *words[split + 1:]]
        files.append(word[1:])
    return flags, run_flags, files


def default_name(data_path, mode):
    folder = Path(data_path).resolve().parent.name
    return folder if folder == mode else f"{folder}_{mode}"


def parse_run_flags(parse, argv):
    """``parse(argv)`` with a parser of the runs' flags; a bad flag is a UserError."""
    try:
        return parse(argv)
    except options.FlagError as error:
        raise UserError(f"flags for the runs: {error}") from None


def options_given(argv):
    """Names of the run options that ``argv`` sets (abbreviations resolved as argparse does):
    those whose value is not the default, an object that no flag can give."""
    parser = options.build_parser()
    unset = object()
    parser.set_defaults(**{name: unset for name in vars(parser.parse_args([]))})
    given = parse_run_flags(parser.parse_args, argv)
    return {name for name, value in vars(given).items() if value is not unset}


def check_run_flags(study):
    """Refuse flags after `--` that reproduce.py sets itself, or that the runs would refuse;
    return the first seed's run options (for the data statistics)."""
    reserved_here = RESERVED_FLAGS | {flag[2:].split("=")[0] for method in study.run_methods
                                      if method in RUN_VARIANTS for flag in RUN_VARIANTS[method][2]}
    reserved = sorted(options_given(study.run_flags) & reserved_here)
    if reserved:
        names = ", ".join(f"--{name}" for name in reserved)
        raise UserError(f"{names} after `--`: reproduce.py sets these for each run; give the "
                        f"data and budget flags before `--` (see reproduce.py --help)")
    return parse_run_flags(options.parse_args,
                           [*data_flags(study), f"--random_seed={study.seeds[0]}", *study.run_flags])


def data_flags(study):
    return [f"--mode={study.mode}", f"--data_path={study.data_path}",
            *(f"--{flag}={getattr(study, flag)}" for flag in DATA_FLAGS)]


def study_flags(study):
    """Every flag that the runs of all seeds and models share."""
    return [*data_flags(study), *(f"--{flag}={getattr(study, flag)}" for flag in BUDGET_FLAGS),
            *study.run_flags]
