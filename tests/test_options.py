"""The command line: every flag is checked when it is parsed, a bad one is a one-line error,
an unwritable output folder is found before the data is read, and Ctrl-C never prints a
traceback."""
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from config import RunFilesConfig
import main
import options
from options import FlagError, parse_args
from run.errors import UserError, run_cli
from study import study_options
import train_original

ROOT = Path(__file__).resolve().parents[1]

BAD_FLAGS = [
    ("--inner_lr=-1", "--inner_lr must be a positive finite number"),
    ("--outer_lr=nan", "--outer_lr must be a positive finite number"),
    ("--lstm_lr=inf", "--lstm_lr must be a positive finite number"),
    ("--inner_lr=1e300", "--inner_lr must be a positive finite number (in float32)"),
    ("--pretraining_lr=0", "--pretraining_lr must be a positive finite number"),
    ("--learn_lr=-0.001", "--learn_lr must be a positive finite number"),
    ("--min_outer_lr=-1", "--min_outer_lr must be a finite number of at least 0"),
    ("--loss_weight_decay=nan", "--loss_weight_decay must be a finite number of at least 0"),
    ("--bert_dropout=1.5", "--bert_dropout is a dropout probability"),
    ("--bert_dropout=-0.1", "--bert_dropout is a dropout probability"),
    ("--max_seq_len=1", "--max_seq_len=1 is too short"),
    ("--num_train_iterations=0", "--num_train_iterations must be at least 1"),
    ("--pretrain_epochs=0", "--pretrain_epochs must be at least 1"),
    ("--batch_size=0", "--batch_size must be at least 1"),
    ("--lstm_hidden=0", "--lstm_hidden must be at least 1"),
    ("--gru4rec_n_layers=0", "--gru4rec_n_layers must be at least 1"),
    ("--min_sub_window_size=0", "--min_sub_window_size must be at least 1"),
    ("--recompute_inner_steps=-1", "--recompute_inner_steps must be at least 0"),
    ("--checkpoint_step=-2", "--checkpoint_step must be at least -1"),
    ("--inner_lr=abc", "invalid float value"),
    ("--inverse_frequency_weights=True", "give it with --use_adaptive_loss=False"),
    ("--rating_blind_encoder=True --use_lstm=False --use_mlp=True", "give it with --use_adaptive_loss=True"),
    ("--use_vmap=maybe", "expected True or False"),
    ("--compile=True --model=gru4rec", "compile bert4rec, sasrec, ncf, or leave --compile out"),
    ("--compile=True --use_vmap=False", "give it with --use_vmap=True"),
    ("--mode=netflix", "--mode=netflix is not a dataset reader here"),
    ("--model=sasrec4", "--model=sasrec4 is not a model here"),
    ("--min_sequence=4 --min_sub_window_size=4", "raise --min_sequence to 5"),
    ("--min_sequence=2 --min_sub_window_size=1", "raise --min_sequence to 3"),
]


@pytest.mark.parametrize("flag, message", BAD_FLAGS)
def test_a_bad_flag_is_a_one_line_error(flag, message, capsys):
    with pytest.raises(FlagError, match=re.escape(message)):
        parse_args(flag.split())
    with pytest.raises(SystemExit) as stopped:
        main.run_cli(lambda: main.main(flag.split()))
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert message in error
    assert error.count("\n") == 1 and "usage:" not in error, "one line, without the usage"


def test_good_flags_pass():
    args = parse_args(["--inner_lr=0.01", "--bert_dropout=0", "--max_seq_len=3", "--min_sub_window_size=2",
                       "--checkpoint_step=-1", "--min_outer_lr=0"])
    assert args.inner_lr == 0.01 and args.bert_dropout == 0 and args.max_seq_len == 3


def test_help_still_shows_the_usage(capsys):
    with pytest.raises(SystemExit) as stopped:
        parse_args(["--help"])
    assert stopped.value.code == 0
    assert "usage:" in capsys.readouterr().out


def help_entries(parser):
    """{option: its help text} from ``parser``'s --help (each entry up to the next option)."""
    text = parser.format_help().split("options:\n", 1)[1]
    entries = re.split(r"\n(?=  -)", text)
    return {entry.split()[0].rstrip(","): " ".join(entry.split()) for entry in entries if entry.strip()}


@pytest.mark.parametrize("parser", [options.build_parser(), study_options.build_parser()], ids=["main-train_original", "reproduce"])
def test_help_shows_every_default_and_what_a_boolean_takes(parser):
    entries = help_entries(parser)
    flags = [action for action in parser._actions if action.dest != "help"]
    assert len(entries) == len(flags) + 1
    for action in flags:
        entry = entries[action.option_strings[0]]
        assert "(default: " in entry, entry
        if action.type is options.str2bool:
            assert entry.startswith(f"{action.option_strings[0]} True|False"), entry


@pytest.mark.parametrize("script, folder_flag", [(main, "--log_dir"), (train_original, "--pretrain_log_dir")])
def test_an_unwritable_folder_is_reported_before_the_data_is_read(script, folder_flag, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the folder should be
    with pytest.raises(UserError, match="cannot write to"):
        script.main([f"{folder_flag}={blocked / 'log'}", f"--data_path={tmp_path / 'missing.dat'}"])


@pytest.mark.parametrize("phase", ["importing", "downloading"])
def test_ctrl_c_at_start_up_exits_130_without_a_traceback(phase, tmp_path):
    """While the script imports, and once it waits for a MovieLens download from a loopback
    server that accepts the connection and never answers."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        url = f"http://127.0.0.1:{server.getsockname()[1]}/ml-1m.zip"
        process = subprocess.Popen([sys.executable, str(ROOT / "main.py"), f"--log_dir={tmp_path / 'log'}",
                                    "--data_path=Data/ml-1m/ratings.dat", f"--download_url={url}"],
                                   cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if phase == "importing":
            time.sleep(0.4)
        else:
            server.settimeout(120)
            connection, _ = server.accept()  # the script is past its imports, in the download
        process.send_signal(signal.SIGINT)
        _, errors = process.communicate(timeout=120)
        if phase == "downloading":
            connection.close()
    assert process.returncode == 130, errors
    assert "Traceback" not in errors


# --- the flag table ------------------------------------------------------------------------------
def test_every_flag_is_classified_once():
    names = [flag.name for flag in options.FLAGS]
    assert len(names) == len(set(names))
    assert {action.dest for action in options.build_parser()._actions} - {"help"} == set(names)
    for flag in options.FLAGS:
        assert flag.resume in ("fixed", "changes", "ignored"), flag.name
        assert flag.study in (None, "data", "budget", "per run"), flag.name
        assert flag.rate in (None, "positive", "non-negative"), flag.name
        assert set(flag.shape_of) <= set(options.MODELS), flag.name
        assert flag.identity in (None, "data", "training"), flag.name
        assert not (flag.identity == "data" and flag.resume != "fixed"), f"{flag.name}: the data cannot change on resume"
        assert not (flag.shape_of and flag.resume != "fixed"), flag.name


def test_runs_that_compute_something_else_have_folders_of_their_own(tmp_path):
    from run.run_files import run_folder
    ratings = tmp_path / "ratings.dat"
    ratings.write_text("1::2::3::4\n")

    def folder(*flags, method="melo"):
        return run_folder(RunFilesConfig.from_args(parse_args([f"--data_path={ratings}", *flags])), "log", method)

    assert folder() != folder("--outer_lr=0.01") != folder("--num_train_iterations=10") != folder()
    assert folder() != folder("--normalize_weights=True") != folder("--use_adaptive_loss=False", method="maml")
    assert folder() == folder("--device=cpu", "--use_vmap=False", "--support_chunks=1", "--log_dir=other")
    assert folder(method="basic") == folder("--outer_lr=0.01", method="basic")   # Basic reads no outer rate
    before = folder()
    ratings.write_text("1::2::5::4\n")            # the same size, another content
    assert folder() != before


def test_basic_run_folders_are_named_as_before_the_flag_table():
    """Basic's identity, derived from the table, names its folders as when it was listed by
    hand (the data file's content joins it when the file exists)."""
    from run.run_files import run_folder
    expected = {"bert4rec": "73e4e6d4", "sasrec": "2a7c84e2", "gru4rec": "05661dd7", "narm": "bfef3ed8",
                "ncf": "a78a0bca"}
    for model, digest in expected.items():
        folder = run_folder(RunFilesConfig.from_args(parse_args(["--data_path=/nowhere/ratings.dat", f"--model={model}"])), "log")
        assert folder.name == f"nowhere-ratings_seed222_{model}_{digest}"


def test_debug_shows_the_traceback_behind_a_one_line_error(tmp_path, monkeypatch, capsys):
    def failing():
        try:
            {}["missing"]
        except KeyError:
            raise UserError("a clear line") from None

    with pytest.raises(SystemExit) as stopped:
        run_cli(failing)
    assert stopped.value.code == 2 and capsys.readouterr().err == "error: a clear line\n"
    monkeypatch.setenv("MELO_DEBUG", "1")
    with pytest.raises(UserError) as raised:
        run_cli(failing)
    assert isinstance(raised.value.__context__, KeyError) and not raised.value.__suppress_context__


@pytest.mark.parametrize("seed, wrong", [(-1, "at least 0"), (2**32, "at most 4294967295")])
def test_seeds_out_of_numpys_range_are_refused_in_one_line(seed, wrong):
    with pytest.raises(FlagError, match=f"--random_seed must be {wrong}, got {seed}"):
        parse_args([f"--random_seed={seed}"])
    with pytest.raises(UserError, match=f"--seeds {seed}: must be {wrong}"):
        study_options.parse_command_line(["--data_path=ratings.dat", "--seeds", "222", str(seed)])
    assert parse_args([f"--random_seed={2**32 - 1}"]).random_seed == 2**32 - 1
