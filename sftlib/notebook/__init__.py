"""What notebooks use and the training path never does: the settings form and a few helpers.

    from sftlib import notebook as nb
    from sftlib.notebook import ConfigForm       # needs ipywidgets; imported on first use
    form = ConfigForm(PRESET, {"lora.r": LORA_R})
    plot = nb.live_loss_plot()
    plot = nb.live_preference_plot()             # loss and reward margin, for `train.method: dpo | orpo`
    nb.save_results(RESULTS_PATH, {...})
    OUTPUT_DIR = nb.drive_folder(DRIVE_FOLDER, OUTPUT_DIR)   # Google Drive in Colab, else unchanged
"""

from sftlib.notebook.colab import drive_folder
from sftlib.notebook.helpers import adapters_folder, live_loss_plot, raw_rows, save_results
from sftlib.notebook.preference_plot import live_preference_plot

__all__ = ["ConfigForm", "adapters_folder", "drive_folder", "live_loss_plot", "live_preference_plot", "raw_rows",
           "save_results"]


def __getattr__(name: str):
    if name == "ConfigForm":  # ipywidgets only when the form is wanted
        from sftlib.notebook.form import ConfigForm

        return ConfigForm
    raise AttributeError(f"module 'sftlib.notebook' has no attribute {name!r}")
