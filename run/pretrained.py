"""Basic's pretrained files for MAML and MELO: with --save_pretrained=True train_original.py
saves its best epoch's embedding and whole model (run_files.pretrained_paths), each with the
identity of its run; --load_pretrained_embedding / --load_pretrained start main.py from one,
checked to be of the same data and model flags."""
from run.atomic_files import WriteError, load_checked, save_checked
from run.errors import UserError
from run.run_files import check_identity, load_matching_state, pretrained_paths, refuse_non_finite, run_identity


def save_pretrained(config, model):
    """Basic's ``model``: its embedding and the whole of it, for the run files ``config``."""
    paths, identity = pretrained_paths(config), run_identity(config)
    try:
        save_checked({"identity": identity, "state": model.embedding.state_dict()}, paths["embedding"])
        save_checked({"identity": identity, "state": model.state_dict()}, paths["model"])
    except WriteError as error:
        raise UserError(f"{error}; free some space and train Basic again") from None


def load_pretrained(config, model, what):
    """Start ``model`` from Basic's ``what``: "embedding" (into ``model.embedding``) or "model"."""
    path, command = pretrained_paths(config)[what], pretraining_command(config)
    module = model.embedding if what == "embedding" else model
    if not path.is_file():
        raise UserError(f"no pretrained {what} at {path}; make it first with: {command}")
    try:
        saved = load_checked(path, map_location="cpu", weights_only=True)
        identity, state = saved["identity"], saved["state"]
    except Exception as error:  # a damaged or foreign file: say which and why
        raise UserError(f"cannot read pretrained {what} {path}: {error}; make it again with: {command}") from None
    check_identity(identity, config, f"pretrained {what} {path}", command)
    refuse_non_finite(state, f"pretrained {what} {path}", f"make it again with: {command}")
    load_matching_state(module, state, f"pretrained {what} {path}", command)
    print(f"Loaded pretrained {what} from {path}")


def pretraining_command(config):
    """The train_original.py command that writes the pretrained files for these flags."""
    return (f"python train_original.py --model={config.model} --mode={config.mode} "
            f"--data_path={config.data_path} --pretrain_log_dir={config.pretrain_log_dir} "
            f"--save_pretrained=True (with the same model and data flags)")
