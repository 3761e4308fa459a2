"""Reading the weights of the reward and evaluation models (ref/hed.py, ref/dpt.py, ref/segmenter.py) and refusing a
file made for another task by name, before any key is compared: a DPT file given as the HED annotator is reported as
"FILE holds DPT depth weights (dpt.* keys), not the HED annotator's weights (...)", not as 300 missing keys.

State dicts are read by ref.checkpoints.read_checkpoint (PyTorch files restricted to tensors, .safetensors, model
folders).
"""
import os
import zipfile
from dataclasses import dataclass


from ref.checkpoints import check_state_fits, read_state_dict


@dataclass(frozen=True)
class Layout:
    """A model file this project can tell apart: what to call it in an error, and a test on its keys."""
    description: str
    prefixes: tuple  # the file holds this model when any key starts with one of these


LAYOUTS = {
    "hed": Layout("the HED annotator's weights (ControlNetHED_Apache2: norm, block1.convs.0 ... block5.projection)",
                  ("block1.convs.0.",)),
    "hed_bsds500": Layout("the original HED's weights (network-bsds500: netVggOne / moduleVggOne keys)",
                          ("netVggOne.", "moduleVggOne.")),
    "lineart": Layout("the LineArt annotator's weights (sk_model.pth: model0 ... model4 keys)", ("model0.1.",)),
    "dpt": Layout("DPT depth weights (dpt.* keys)", ("dpt.",)),
    "stable_diffusion": Layout("a Stable Diffusion / ControlNet checkpoint (model.diffusion_model.* / "
                               "control_model.* keys)", ("model.diffusion_model.", "control_model.")),
}
SHOWN = 6  # differences named per kind when a file does not fit
TORCHSCRIPT = "a TorchScript program (a segmenter plug-in?)"

def layout_of(keys):
    """The LAYOUTS name of the model whose keys these are, or None for a file of none of them."""
    for name, layout in LAYOUTS.items():
        if any(key.startswith(layout.prefixes) for key in keys):
            return name
    return None


def is_torchscript(path):
    """torch.jit.save writes a zip archive holding code/ and constants.pkl; torch.save's archive has neither."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def read_state(path, expected):
    """ref.checkpoints.read_state_dict, refusing a TorchScript archive by name. -> {key: tensor}, {key: file key}"""
    if os.path.isfile(path) and is_torchscript(path):
        raise ValueError(f"{path} holds {TORCHSCRIPT}, not {expected}")
    return read_state_dict(path, expected)


def read_task_weights(path, task):
    """The state dict of `path` for the LAYOUTS entry `task`, refused by name when the file holds another known
    model's weights. -> {key: tensor}, {key: the key in the file}"""
    expected = LAYOUTS[task].description
    state, original = read_state(path, expected)
    found = layout_of(state)
    if found is not None and found != task:
        raise ValueError(f"{path} holds {LAYOUTS[found].description}, not {expected}")
    return state, original


def load_task_weights(model, path, task):
    """Copy the `task` weights in `path` into `model`: a file of another known model is refused by name, one of this
    layout with wrong keys or shapes with every difference listed (load_state)."""
    load_state(model, path, *read_task_weights(path, task))


def load_state(model, path, state, original):
    """Copy a state dict read from `path` (and its file keys) into `model`, every difference of keys or shapes listed
    first (ref.checkpoints.check_state_fits)."""
    try:
        check_state_fits(model, state, original)
    except ValueError as error:  # keep the counts and the first few names of each kind of difference
        lines = [line if line.count("; ") < SHOWN else "; ".join(line.split("; ")[:SHOWN]) + "; ..."
                 for line in str(error).splitlines()]
        raise ValueError(f"{path}: " + "\n".join(lines)) from None
    model.load_state_dict(state)


def refuse_unless_torchscript(path, expected):
    """Raise a ValueError unless `path` is a TorchScript archive, naming what the file holds instead when it is the
    state dict of a known model."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file ({expected} expected)")
    if is_torchscript(path):
        return
    try:
        found = layout_of(read_state(path, expected)[0])
    except ValueError:
        found = None
    held = LAYOUTS[found].description if found else "no TorchScript program (torch.jit.save writes one)"
    raise ValueError(f"{path} holds {held}, not {expected}")
